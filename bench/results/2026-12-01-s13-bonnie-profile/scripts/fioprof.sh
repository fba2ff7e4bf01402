#!/bin/bash
# fioprof.sh SERVER OUT: as fiopath.sh, with perf record -g of the server for each phase
D=/var/tmp/bon; S=$1; O=$2; mkdir -p $O; export NOMKFS=1
$D/up.sh $S >/dev/null || { echo UP FAILED; $D/down.sh; exit 1; }
DEV=$(cat $D/dev); P=$(cat $D/server.pid)
for rw in write read; do
  perf record -q -g -F 999 -p $P -o $O/$rw.data & PP=$!; sleep 0.3
  fio --name=j --filename=$DEV --direct=1 --ioengine=libaio --bs=1280k --iodepth=4 --rw=$rw --size=2g 2>&1 | grep -E "^ +(READ|WRITE):" | sed "s/^/$S /"
  kill -INT $PP; wait $PP
done
$D/down.sh >/dev/null
