#!/bin/bash
# server task-clock for a fixed 4 GiB of 1 MiB writes at QD8 over TCP; $1 label $2 env
IMG=/var/tmp/ab.img
env $2 /work/main/.venv/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done
perf stat -e task-clock,context-switches -p $P -o /tmp/cpuw.txt & S=$!; sleep 0.2
OUT=$(fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10899/ --rw=write --bs=1m --iodepth=8 --size=1g --loops=4 --output-format=json 2>/dev/null)
kill -INT $S; wait $S; kill $P; wait $P 2>/dev/null
TC=$(awk '/task-clock/ {gsub(",","",$1); print $1}' /tmp/cpuw.txt); CS=$(awk '/context-switches/ {gsub(",","",$1); print $1}' /tmp/cpuw.txt)
echo "$OUT" | python3 -c "
import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find('{'):])['jobs'][0]; s=d['write']
mib=s['io_bytes']/2**20; print(f'$1 {s[\"bw_bytes\"]/2**20:.0f} MiB/s server {float($TC)*1000/mib:.0f} us/MiB, {float($CS)/mib:.2f} cs/MiB, client {d[\"usr_cpu\"]+d[\"sys_cpu\"]:.0f}%')"
