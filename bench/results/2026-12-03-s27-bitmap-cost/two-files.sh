#!/bin/bash
# Cost of keeping a dirty bitmap: the same qcow2 image (every cluster written) with and
# without an enabled bitmap, served by tapnbd, fio's nbd engine, rows alternating.
set -e
D=/var/tmp/rw/bm
T=/work/main/.venv/bin/tapnbd
cd $D
rm -f *.qcow2 src.raw
head -c $((1<<30)) /dev/urandom > src.raw
qemu-img convert -f raw -O qcow2 src.raw plain.qcow2
rm -f src.raw
cp plain.qcow2 tracked.qcow2
qemu-img bitmap --add tracked.qcow2 b0
$T serve --format qcow2 -p 10930 plain.qcow2 > plain.log 2>&1 &
P1=$!
$T serve --format qcow2 -p 10931 tracked.qcow2 > tracked.log 2>&1 &
P2=$!
for p in 10930 10931; do for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$p >/dev/null 2>&1 && break; sleep 0.1; done; done
run() { # port rw bs qd
  n=plain.qcow2; [ $1 = 10931 ] && n=tracked.qcow2
  fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:$1/$n --rw=$2 --bs=$3 --iodepth=$4 --size=1G --time_based --runtime=4 --output-format=json 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round((j["write"]["bw_bytes"]+j["read"]["bw_bytes"])/2**20,1))'
}
for row in "randwrite 4k 32" "write 1M 8"; do
  set -- $row
  run 10930 $1 $2 $3 >/dev/null; run 10931 $1 $2 $3 >/dev/null   # warm-up
  for rep in 1 2 3 4 5 6 7 8; do
    if [ $((rep % 2)) = 1 ]; then a=$(run 10930 $1 $2 $3); b=$(run 10931 $1 $2 $3); else b=$(run 10931 $1 $2 $3); a=$(run 10930 $1 $2 $3); fi
    echo "$1 $2 QD$3 rep $rep: plain $a MiB/s, tracked $b MiB/s, ratio $(python3 -c "print(round($b/$a,3))")"
  done
done
kill $P1 $P2; wait
qemu-img info tracked.qcow2 | grep -A4 "\[0\]"
nbdinfo --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 tracked.qcow2 ] | head -3
