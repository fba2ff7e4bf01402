#!/bin/bash
# rounds2.sh N OUT: one unmeasured warm-up run, then N rounds of bon1.sh over tapnbd,
# proto, nbdkit, the order rotated each round.
N=$1; OUT=$2; order=(tapnbd proto nbdkit)
echo "warm-up $(flock /work/runs/bench.lock /var/tmp/bon36/bon1.sh nbdkit)" >> $OUT
for r in $(seq $N); do
  for k in 0 1 2; do
    s=${order[$(( (k + r) % 3 ))]}
    echo "round=$r $(flock /work/runs/bench.lock /var/tmp/bon36/bon1.sh $s)" >> $OUT
    [ $s = proto ] && grep PW /var/tmp/bon36/server.err | tr '\n' ' ' >> $OUT && echo >> $OUT
  done
done
echo done >> $OUT
