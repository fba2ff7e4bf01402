#!/bin/bash
# usage: perfring.sh RW BS QD TAG : ring serve under perf record (kernel + user), ring bench plain
set -e
WT=/work/wt-ringwrite; PY=$WT/.venv/bin/python; OUT=${OUT:-/var/tmp/rw/prof}; mkdir -p $OUT
RW=$1; BS=$2; QD=$3; TAG=$4; RT=${RT:-5}; IMG=${IMG:-/var/tmp/rw/img.raw}
VBD=$(mktemp -d /dev/shm/rwvbd.XXXX)
$PY -m tapnbd ring serve $IMG --format raw --path $VBD > $OUT/$TAG-server.out 2> $OUT/$TAG-server.log &
SP=$!
for i in $(seq 100); do [ -s $OUT/$TAG-server.out ] && break; sleep 0.1; done
python3 -c "import os; fd=os.open('$IMG', os.O_RDONLY); os.fsync(fd)"
$PY -m tapnbd ring bench --path $VBD --rw=$RW --bs=$BS --iodepth=$QD --size=$((1024<<20)) --runtime=$RT --json > $OUT/$TAG-client.json 2>/dev/null &
CP=$!
sleep 1
perf record -F 997 -g -o $OUT/$TAG-server.perf.data -p $SP -- sleep $((RT-2)) >/dev/null 2>&1
wait $CP
kill $SP; wait $SP || true
rm -rf $VBD
perf report -i $OUT/$TAG-server.perf.data --stdio --no-children -g none --percent-limit 0.7 --sort symbol 2>/dev/null | grep -v "^$" | grep -v "^#" | head -40 > $OUT/$TAG-server.perf.txt
perf report -i $OUT/$TAG-server.perf.data --stdio --children -g none --percent-limit 3 --sort symbol 2>/dev/null | grep -v "^$" | grep -v "^#" | head -40 > $OUT/$TAG-server.perf-children.txt
rm -f $OUT/$TAG-server.perf.data
