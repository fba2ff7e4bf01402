#!/bin/bash
# fiopath.sh SERVER [SIZE]: server + nbdfuse + loop (dio), no fs; fio write then read
# 1280k direct at QD4 (what loop sends under bonnie), server CPU per phase from /proc.
D=/var/tmp/bon36; S=$1; SZ=${2:-2g}
export NOMKFS=1
/var/tmp/bon36/up.sh $S >/dev/null || { echo UP FAILED; /var/tmp/bon36/down.sh; exit 1; }
DEV=$(cat $D/dev); P=$(cat $D/server.pid); F=$(cat $D/fuse.pid)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for rw in write read; do
  s0=$(cpu $P); f0=$(cpu $F); t0=$(date +%s.%N)
  r=$(fio --name=j --filename=$DEV --direct=1 --ioengine=libaio --bs=1280k --iodepth=${QD:-4} --rw=$rw --size=$SZ --group_reporting 2>&1 | grep -E "^ +(READ|WRITE):" | sed 's/.*bw=\([^ ]*\) .*/\1/')
  t1=$(date +%s.%N); s1=$(cpu $P); f1=$(cpu $F)
  echo "$S $rw $r server_cpu_s=$(echo "($s1-$s0)/100" | bc -l | cut -c1-5) nbdfuse_cpu_s=$(echo "($f1-$f0)/100" | bc -l | cut -c1-5) wall=$(echo "$t1-$t0" | bc | cut -c1-5)"
done
/var/tmp/bon36/down.sh >/dev/null
