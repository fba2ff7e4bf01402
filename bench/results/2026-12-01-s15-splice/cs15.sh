#!/bin/bash
# context switches + syscalls of the server during fio seq write; $1 env
IMG=/var/tmp/ab.img
env $1 /work/main/.venv/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done
perf stat -e 'syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_setsockopt,syscalls:sys_enter_pwritev2,context-switches' -p $P -o /tmp/cs15.txt &
S=$!; sleep 0.2
fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10899/ --rw=${RW:-write} --bs=${BS:-1m} --iodepth=8 --size=1g --time_based --runtime=4 --output-format=terse 2>/dev/null | awk -F';' '{print "write MiB/s", $48/1024}'
kill -INT $S; wait $S; kill $P; wait $P 2>/dev/null
grep -E "syscalls|context" /tmp/cs15.txt
