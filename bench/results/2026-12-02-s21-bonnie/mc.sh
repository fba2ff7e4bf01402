#!/bin/bash
# 4 connections x QD2 x 1M seq writes into a new sparse 4 GiB image (nbdfuse-like).
KIND=$1; IMG=/var/tmp/rw/mc.raw; S=/var/tmp/rw/mc.sock
rm -f $IMG $S; truncate -s 4G $IMG
case $KIND in
  nk) nbdkit -f -U $S file $IMG & P=$!; URI="nbd+unix:///?socket=$S";;
  tap) /work/main/.venv/bin/tapnbd serve --format raw -k $S a=$IMG >/dev/null 2>&1 & P=$!; URI="nbd+unix:///a?socket=$S";;
esac
for i in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.05; done
S0=$(awk '{print $14+$15}' /proc/$P/stat)
fio --name=w --ioengine=nbd --uri="$URI" --rw=write --bs=${BS:-1M} --iodepth=${QD:-2} --numjobs=4 --size=900M --offset_increment=1G --group_reporting --output-format=terse 2>/dev/null | awk -F';' '{printf "%s MiB/s ", $48/1024}'
S1=$(awk '{print $14+$15}' /proc/$P/stat); echo "$KIND server cpu $(( S1 - S0 )) ticks"
kill $P; wait $P 2>/dev/null
