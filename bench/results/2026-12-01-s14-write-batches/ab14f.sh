#!/bin/bash
# fio bench (TCP), rand write 4k QD32: main vs s14p (write batches), each with nbdkit, alternating.
for r in 1 2; do
  if [ $r = 1 ]; then order="main s14p"; else order="s14p main"; fi
  for v in $order; do
    if [ $v = main ]; then cd /work/main; else cd /work/wt-s14p; fi
    flock /work/runs/bench.lock .venv/bin/python -m bench fio --only tapnbd-raw --only nbdkit-raw \
      --jobs randwrite --repeat 3 --runtime 4 --out /work/runs/s14-abf/r$r-$v > /work/runs/s14-abf/r$r-$v.log 2>&1
  done
done
echo done > /work/runs/s14-abf/DONE
