#!/bin/bash
# run1.sh SERVER : up, bonnie, down; prints block columns
D=/var/tmp/bon; S=$1; shift
$D/up.sh $S >/dev/null || { echo UP FAILED; $D/down.sh; exit 1; }
mountpoint -q $D/mnt || { echo NOT MOUNTED; exit 1; }
cat /proc/loadavg
"$@"
nocache bonnie++ -d $D/mnt -s 2048 -r 512 -n 0 -u root -q -m $S 2>/dev/null | tail -1 | awk -F, '{print "'$S' write",$12,"rewrite",$14,"read",$18}'
$D/down.sh >/dev/null
