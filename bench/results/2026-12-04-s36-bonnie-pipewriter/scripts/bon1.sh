#!/bin/bash
# bon1.sh SERVER: one bonnie run on the stack up.sh builds; prints the bonnie CSV line.
D=/var/tmp/bon36; S=$1
/var/tmp/bon36/up.sh $S >/dev/null || { echo UP FAILED; /var/tmp/bon36/down.sh; exit 1; }
P=$(cat $D/server.pid); F=$(cat $D/fuse.pid)
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
s0=$(cpu $P); f0=$(cpu $F)
out=$(nocache bonnie++ -d $D/mnt -s 2048 -r 512 -n 0 -u root -q -m $S 2>/dev/null | tail -1)
s1=$(cpu $P); f1=$(cpu $F)
echo "$out" | awk -F, '{printf "%s block_write=%s rewrite=%s block_read=%s ", $3, $12, $14, $18}'
echo "server_cpu_s=$(echo "($s1-$s0)/100" | bc -l | cut -c1-5) nbdfuse_cpu_s=$(echo "($f1-$f0)/100" | bc -l | cut -c1-5)"
/var/tmp/bon36/down.sh >/dev/null
