#!/bin/bash
# abrw.sh MODE ROUNDS: MODE=cold (drop cache) or warm (drop, then read whole file in 8 MiB reads)
MODE=$1; N=$2; IMG=/var/tmp/rw/b.raw
for r in $(seq $N); do
  for s in tap nk; do
    python3 /var/tmp/rw/drop.py $IMG
    [ $MODE = warm ] && python3 -c "
f=open('$IMG','rb',buffering=0)
while f.read(8<<20): pass"
    if [ $s = tap ]; then ./one.sh $IMG raw; else ./onek.sh $IMG; fi
  done
done
