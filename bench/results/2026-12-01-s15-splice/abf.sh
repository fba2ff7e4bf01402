#!/bin/bash
# python -m bench fio, seq write: old (no lowat, no splice) vs new, alternating, each with nbdkit.
cd /work/main
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for v in $order; do
    if [ $v = old ]; then E="TAPNBD_RCVLOWAT=0 TAPNBD_SPLICE=0"; else E="TAPNBD_RCVLOWAT=1 TAPNBD_SPLICE=1"; fi
    env $E .venv/bin/python -m bench fio --only tapnbd-raw --only nbdkit-raw --jobs seqwrite --repeat 3 --runtime 4 --out /work/runs/s15/abf2/r$r-$v > /work/runs/s15/abf2/r$r-$v.log 2>&1
    echo "r$r $v: $(grep -E '^\| tapnbd raw|^\| nbdkit file' /work/runs/s15/abf2/r$r-$v/fio.md | head -2 | tr -s ' ' | cut -c1-80 | tr '\n' ' ')"
  done
done
