#!/bin/bash
# cellprof.sh OUT BS QD VARIANT: one 6 s sequential READ cell over a unix socket (as
# qd.sh), with fio's latency, each side's CPU, and whole-machine perf for 3 s.
set -e
OUT=$1; BS=$2; QD=$3; v=$4
RAW=${RAW:-/var/tmp/rw/fio/fio-random.raw}; SOCK=/var/tmp/rw/qd.sock
PY=/work/main/.venv/bin/python; URI="nbd+unix:///?socket=$SOCK"
mkdir -p "$OUT"; rm -f $SOCK; cat "$RAW" > /dev/null
case $v in
  nk) nbdkit -f -U $SOCK file "$RAW" & P=$!;;
  tap) $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!;;
  tapinline) TAPNBD_IO_THREADS=0 $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!;;
esac
for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
fio --name=r --ioengine=nbd --uri="$URI" --rw=read --bs=$BS --iodepth=$QD --size=1g \
  --time_based --runtime=6 2>/dev/null | grep -E "BW=|cpu|clat \(|lat \(" > "$OUT/$v-fio.txt" &
F=$!
sleep 1.5
t0=$(awk '{print $14+$15}' /proc/$P/stat)
perf record -q -a -g -F 999 -o "$OUT/$v.data" -- sleep 3 >/dev/null 2>&1
t1=$(awk '{print $14+$15}' /proc/$P/stat)
wait $F; kill $P; wait $P 2>/dev/null || true
echo "server ticks in 3 s: $((t1 - t0))" >> "$OUT/$v-fio.txt"
rep() { perf report -i "$OUT/$v.data" --stdio -g none "$@" 2>/dev/null | grep -E "^ +[0-9]"; }
rep --no-children --sort comm,dso,sym | head -50 > "$OUT/$v-profile.txt"
rep --no-children --sort comm | head -10 > "$OUT/$v-by-command.txt"
rm -f "$OUT/$v.data"
