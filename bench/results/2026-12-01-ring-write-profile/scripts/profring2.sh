#!/bin/bash
# usage: profring2.sh RW BS QD TAG : ring serve and ring bench, both under py-spy (nonblocking)
set -e
WT=/work/wt-ringwrite; PY=$WT/.venv/bin/python; OUT=${OUT:-/var/tmp/rw/prof}; mkdir -p $OUT
RW=$1; BS=$2; QD=$3; TAG=$4; RT=${RT:-6}; IMG=${IMG:-/var/tmp/rw/img.raw}
VBD=$(mktemp -d /dev/shm/rwvbd.XXXX)
$PY -m tapnbd ring serve $IMG --format raw --path $VBD > $OUT/$TAG-server.out 2> $OUT/$TAG-server.log &
SP=$!
for i in $(seq 100); do [ -s $OUT/$TAG-server.out ] && break; sleep 0.1; done
python3 -c "import os; fd=os.open('$IMG', os.O_RDONLY); os.fsync(fd)"
S0=$(awk '{print $14+$15}' /proc/$SP/stat)
$WT/.venv/bin/py-spy record --nonblocking -r 997 -f speedscope -o $OUT/$TAG-client.speedscope.json -- $PY -m tapnbd ring bench --path $VBD --rw=$RW --bs=$BS --iodepth=$QD --size=$((1024<<20)) --runtime=$RT --json > $OUT/$TAG-client.json 2>/dev/null &
CP=$!
sleep 0.3
$WT/.venv/bin/py-spy record --nonblocking -r 997 -d $RT -f speedscope -o $OUT/$TAG-server.speedscope.json --pid $SP >/dev/null 2>&1 &
P1=$!
wait $CP
S1=$(awk '{print $14+$15}' /proc/$SP/stat)
wait $P1 || true
kill $SP; wait $SP || true
rm -rf $VBD
python3 -c "
import json; d=json.loads([l for l in open('$OUT/$TAG-client.json') if l.startswith('{')][-1])
print('$TAG', 'iops', d['iops'], 'MiB/s', d['mib_s'], 'client cpu us/io', round(d['cpu_seconds']/d['ios']*1e6,1), 'server cpu us/io', round(($S1-$S0)/100/d['ios']*1e6,1))" | tee $OUT/$TAG-summary.txt
