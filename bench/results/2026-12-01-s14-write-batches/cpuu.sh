#!/bin/bash
# unix socket: server and fio CPU; args: server(tap|nk) RW BS QD [env]
IMG=/var/tmp/ab.img; S=/tmp/cpuu.sock; rm -f $S; VENV=${VENV:-/work/main/.venv}
if [ $1 = tap ]; then env ${ENVV:-X_=1} $VENV/bin/python -m tapnbd serve $IMG --format raw --socket $S >/dev/null 2>&1 & P=$!; else nbdkit -f -U $S file $IMG & P=$!; fi
for i in $(seq 100); do nbdinfo --size "nbd+unix:///?socket=$S" >/dev/null 2>&1 && break; sleep 0.1; done
T0=$(awk '{print $14+$15}' /proc/$P/stat)
OUT=$(fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$S" --rw=$2 --bs=$3 --iodepth=$4 --size=1g --time_based --runtime=4 --group_reporting --output-format=json 2>/dev/null)
T1=$(awk '{print $14+$15}' /proc/$P/stat)
kill $P; wait $P 2>/dev/null
echo "$OUT" | python3 -c "
import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find('{'):])['jobs'][0]; s=d['write' if '$2'.endswith('write') else 'read']
print(f\"$1 $5: {s['bw_bytes']/2**20:.0f} MiB/s  {s['iops']:.0f} IOPS  server {($T1-$T0)/4:.0f}%  fio usr+sys {d['usr_cpu']+d['sys_cpu']:.0f}%  lat {s['lat_ns']['mean']/1000:.0f} us\")"
