#!/bin/bash
# rounds.sh N OUT: N rounds of bon1.sh over tapnbd, proto, nbdkit, rotated each round.
N=$1; OUT=$2; order=(tapnbd proto nbdkit)
for r in $(seq $N); do
  for k in 0 1 2; do
    s=${order[$(( (k + r) % 3 ))]}
    echo "round=$r $(flock /work/runs/bench.lock /var/tmp/bon36/bon1.sh $s)" >> $OUT
  done
done
echo done >> $OUT
