#!/bin/bash
# fpairs.sh N OUT: N alternating pairs of fiopath writes (2 GiB, 1280k QD4, through
# loop over nbdfuse, no file system), tapnbd (main) and proto, the order swapped each pair.
N=$1; OUT=$2
for i in $(seq $N); do
  if [ $((i % 2)) = 1 ]; then a=tapnbd; b=proto; else a=proto; b=tapnbd; fi
  for s in $a $b; do
    echo "pair=$i $(flock /work/runs/bench.lock /var/tmp/bon36/fiopath.sh $s 2g | grep write)" >> $OUT
  done
done
echo done >> $OUT
