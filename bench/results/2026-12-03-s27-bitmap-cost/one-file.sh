#!/bin/bash
# Cost of keeping a dirty bitmap: ONE qcow2 image (every cluster written), served by
# tapnbd with its bitmap enabled or disabled, a fresh server per cell, the two kinds of
# cell alternating (rotated order), fio's nbd engine.
set -e
D=/var/tmp/rw/bm
T=/work/main/.venv/bin/tapnbd
cd $D
rm -f *.qcow2 *.log
head -c $((1<<30)) /dev/urandom > src.raw
qemu-img convert -f raw -O qcow2 src.raw img.qcow2
rm -f src.raw
qemu-img bitmap --add --disable img.qcow2 b0
cell() { # mode rw bs qd
  if [ $1 = on ]; then $T bitmap -q --enable img.qcow2 b0; else $T bitmap -q --disable img.qcow2 b0; fi
  $T serve --format qcow2 -p 10930 img.qcow2 > srv.log 2>&1 &
  local pid=$!
  for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10930/img.qcow2 >/dev/null 2>&1 && break; sleep 0.1; done
  fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10930/img.qcow2 --rw=$2 --bs=$3 --iodepth=$4 --size=1G --time_based --runtime=4 --output-format=json 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round((j["write"]["bw_bytes"]+j["read"]["bw_bytes"])/2**20,1))'
  kill $pid; wait $pid || true
}
for row in "randwrite 4k 32" "write 1M 8"; do
  set -- $row
  cell off $1 $2 $3 >/dev/null; cell on $1 $2 $3 >/dev/null   # warm-up
  for rep in 1 2 3 4 5 6 7 8; do
    if [ $((rep % 2)) = 1 ]; then a=$(cell off $1 $2 $3); b=$(cell on $1 $2 $3); else b=$(cell on $1 $2 $3); a=$(cell off $1 $2 $3); fi
    echo "$1 $2 QD$3 rep $rep: disabled $a MiB/s, enabled $b MiB/s, ratio $(python3 -c "print(round($b/$a,3))")"
  done
done
qemu-img info img.qcow2 | grep -A4 "\[0\]"
qemu-img check img.qcow2 | head -1
