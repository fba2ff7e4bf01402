#!/bin/bash
# usage: cpuring.sh RW BS QD TAG : ring serve + ring bench, server CPU per I/O from /proc
set -e
WT=/work/wt-ringwrite; PY=$WT/.venv/bin/python; RT=${RT:-4}; IMG=${IMG:-/var/tmp/rw/img4m.raw}
RW=$1; BS=$2; QD=$3; TAG=$4
VBD=$(mktemp -d /dev/shm/rwvbd.XXXX); OUTF=$(mktemp)
$PY -m tapnbd ring serve $IMG --format raw --path $VBD > $OUTF 2>/dev/null &
SP=$!
for i in $(seq 100); do [ -s $OUTF ] && break; sleep 0.1; done
python3 -c "import os; fd=os.open('$IMG', os.O_RDONLY); os.fsync(fd)"
S0=$(awk '{print $14+$15}' /proc/$SP/stat)
J=$($PY -m tapnbd ring bench --path $VBD --rw=$RW --bs=$BS --iodepth=$QD --size=$((1024<<20)) --runtime=$RT --json 2>/dev/null | grep '^{' | tail -1)
S1=$(awk '{print $14+$15}' /proc/$SP/stat)
kill $SP; wait $SP || true; rm -rf $VBD $OUTF
python3 -c "
import json; d=json.loads('''$J''')
print('$TAG', 'MiB/s', d['mib_s'], 'server cpu us/io', round(($S1-$S0)/100/d['ios']*1e6,1), 'client cpu us/io', round(d['cpu_seconds']/d['ios']*1e6,1))"
