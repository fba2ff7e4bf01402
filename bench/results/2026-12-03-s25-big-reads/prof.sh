#!/bin/bash
# prof.sh VARIANT BS: 4 seq read streams at QD1, perf -a for 3 s in the middle, CPU of the server.
V=$1; BS=$2; RAW=/var/tmp/rw/fio/fio-random.raw; SOCK=/var/tmp/rw/prof.sock; PY=/work/main/.venv/bin/python
OUT=${OUTDIR:-.}/$V-$BS; rm -f $SOCK; cat $RAW >/dev/null
case $V in
  nk) nbdkit -f -U $SOCK file "$RAW" & P=$!;;
  tap) (cd /work/main && exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK) >/dev/null 2>&1 & P=$!;;
esac
URI="nbd+unix:///?socket=$SOCK"
for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
fio --name=r --ioengine=nbd --uri="$URI" --rw=read --bs=$BS --iodepth=1 --numjobs=4 --group_reporting --size=1g --time_based --runtime=6 --output-format=terse > $OUT.fio 2>/dev/null &
F=$!
sleep 1.5
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ u0 s0 _ < /proc/$P/stat
perf record -a -o $OUT.data -- sleep 3 2>/dev/null >/dev/null
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ u1 s1 _ < /proc/$P/stat
wait $F
echo "$V $BS server-cpu-ticks user $((u1-u0)) sys $((s1-s0)) (100/s, 3 s) iops $(awk -F';' 'NF>48{print $8}' $OUT.fio)"
kill $P; wait $P 2>/dev/null
perf report -i $OUT.data --sort comm,dso,sym --stdio 2>/dev/null | grep -v "^#" | grep -v "^$" | head -40 > $OUT.top
