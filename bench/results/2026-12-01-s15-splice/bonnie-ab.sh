#!/bin/bash
# Alternating Bonnie rounds through nbdfuse + loop: splice on (1) or off (0), each with nbdkit.
cd /work/main
for r in 1 2 3; do
  for m in 1 0; do
    [ $(( r % 2 )) = 0 ] && m=$(( 1 - m ))
    TAPNBD_SPLICE=$m .venv/bin/python -m bench bonnie --only tap-raw --only nbdkit-file --out /work/runs/s15/bonnie/r$r-s$m > /work/runs/s15/bonnie/r$r-s$m.log 2>&1
  done
done
echo done > /work/runs/s15/bonnie/DONE
