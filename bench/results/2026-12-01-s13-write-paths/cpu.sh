#!/bin/bash
# server CPU (all threads) per MiB during fio; args: env [rw] ; prints MiB/s and us/MiB
IMG=/var/tmp/ab.img; VENV=${VENV:-/work/wt-wthreads/.venv}; RW=${2:-write}
env $1 $VENV/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done
T0=$(awk '{print $14+$15}' /proc/$P/stat)
OUT=$(fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10899/ --rw=$RW --bs=${BS:-1m} --iodepth=${QD:-8} --size=1g --time_based --runtime=4 --group_reporting --output-format=json 2>/dev/null)
T1=$(awk '{print $14+$15}' /proc/$P/stat)
kill $P; wait $P 2>/dev/null
echo "$OUT" | python3 -c "
import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find('{'):])['jobs'][0]; s=d['write' if '$RW'.endswith('write') else 'read']
mib=s['io_bytes']/2**20; cpu=($T1-$T0)/100
print(f'$1: {mib/4:.0f} MiB/s, server {cpu*1e6/mib:.0f} us/MiB')"
