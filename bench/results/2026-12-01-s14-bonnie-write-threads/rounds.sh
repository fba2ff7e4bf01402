#!/bin/bash
# Alternating bonnie rounds: big WRITEs on the I/O threads (1) or on the loop (0).
cd /work/wt-s14w
for r in 1 2 3; do
  for m in 1 0; do
    [ $(( r % 2 )) = 0 ] && m=$(( 1 - m ))
    TAPNBD_IO_WRITES=$m flock /work/runs/bench.lock .venv/bin/python -m bench bonnie --only tap-raw --only nbdkit-file --out /work/runs/s14-bw/r$r-w$m > /work/runs/s14-bw/r$r-w$m.log 2>&1
  done
done
echo done > /work/runs/s14-bw/DONE
