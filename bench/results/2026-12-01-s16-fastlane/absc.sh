#!/bin/bash
# absc.sh OP DRIVER N: statscost (stats off figure) for base and new, alternating
OP=$1; DRV=$2; N=$3
for i in $(seq $N); do
  for t in base new; do
    d=/work/main; [ $t = base ] && d=/var/tmp/rw/basewt
    (cd $d && /work/main/.venv/bin/python -m bench.statscost --driver $DRV --op $OP --batch 32 --requests 50000 --rounds 5 --seed 1 2>&1 | awk -v t=$t '/stats on/{on=$3} /stats off/{print t, "on", on, "off", $3}')
  done
done
