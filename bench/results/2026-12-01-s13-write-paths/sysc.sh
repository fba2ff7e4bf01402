#!/bin/bash
IMG=/var/tmp/ab.img; VENV=${VENV:-/work/wt-wthreads/.venv}
env $1 $VENV/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10896 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10896/ >/dev/null 2>&1 && break; sleep 0.1; done
perf stat -e syscalls:sys_enter_splice,syscalls:sys_enter_pwritev,syscalls:sys_enter_pwritev2,syscalls:sys_enter_futex,syscalls:sys_enter_getrusage,task-clock -p $P -o /work/runs/sysc.$$.txt &
S=$!
fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10896/ --rw=write --bs=1m --iodepth=8 --size=1g --time_based --runtime=4 --group_reporting 2>/dev/null | grep WRITE: | cut -c1-40
kill -INT $S; wait $S; kill $P; wait $P 2>/dev/null
grep -E "sys_enter|msec" /work/runs/sysc.$$.txt | awk "{print \"   \",\$1,\$2,\$3}"
