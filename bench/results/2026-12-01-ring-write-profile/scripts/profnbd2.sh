#!/bin/bash
# usage: profnbd2.sh RW BS QD TAG : tapnbd serve under py-spy (nonblocking), fio under perf record
set -e
WT=/work/wt-ringwrite; PY=$WT/.venv/bin/python; OUT=${OUT:-/var/tmp/rw/prof}; mkdir -p $OUT
RW=$1; BS=$2; QD=$3; TAG=$4; RT=${RT:-6}; IMG=${IMG:-/var/tmp/rw/img.raw}
rm -f $OUT/$TAG-server.out
$PY -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 0 > $OUT/$TAG-server.out 2> $OUT/$TAG-server.log &
SP=$!
for i in $(seq 100); do grep -q '^nbd' $OUT/$TAG-server.out 2>/dev/null && break; sleep 0.1; done
URI=$(grep '^nbd' $OUT/$TAG-server.out | head -1)
python3 -c "import os; fd=os.open('$IMG', os.O_RDONLY); os.fsync(fd)"
S0=$(awk '{print $14+$15}' /proc/$SP/stat)
$WT/.venv/bin/py-spy record --nonblocking -r 997 -d $RT -f speedscope -o $OUT/$TAG-server.speedscope.json --pid $SP >/dev/null 2>&1 &
P1=$!
perf record -F 997 -g -o $OUT/$TAG-client.perf.data -- fio --name=$TAG --ioengine=nbd --uri=$URI --rw=$RW --bs=$BS --iodepth=$QD --size=1G --time_based --runtime=$RT --group_reporting --output-format=json > $OUT/$TAG-client.json 2>/dev/null
S1=$(awk '{print $14+$15}' /proc/$SP/stat)
wait $P1 || true
kill $SP; wait $SP || true
perf report -i $OUT/$TAG-client.perf.data --stdio --no-children -g none --percent-limit 0.5 --sort dso,symbol 2>/dev/null | grep -v "^$" | head -60 > $OUT/$TAG-client.perf.txt
rm -f $OUT/$TAG-client.perf.data
python3 -c "
import json; t=open('$OUT/$TAG-client.json').read(); d=json.loads(t[t.find('{'):]); j=d['jobs'][0]; s=j['write' if 'write' in '$RW' else 'read']
print('$TAG', 'iops', round(s['iops']), 'MiB/s', round(s['bw_bytes']/2**20), 'fio cpu us/io', round((j['usr_cpu']+j['sys_cpu'])/100/s['iops']*1e6,1), 'server cpu us/io', round(($S1-$S0)/100/($RT*s['iops'])*1e6,1))" | tee $OUT/$TAG-summary.txt
