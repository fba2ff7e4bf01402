#!/bin/bash
cd /work/wt-ringwrite
for rep in 1 2 3; do
for cfg in A C B; do
  case $cfg in
    A) export PYTHONPATH=/var/tmp/rw/mainsrc;;
    C) export PYTHONPATH=/var/tmp/rw/benchonly:/var/tmp/rw/mainsrc;;
    B) unset PYTHONPATH;;
  esac
  .venv/bin/python -m bench ring --jobs '*write' --runtime 5 --size 1024 --repeat 1 --out /var/tmp/rw/ab/$cfg-$rep > /var/tmp/rw/ab/$cfg-$rep.log 2>&1
  echo "$cfg-$rep done $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
done; done
