#!/bin/bash
# spy.sh DIR: tapnbd serve through the bonnie path, py-spy record (native, all threads) during bonnie
D=/var/tmp/bon; O=$1; mkdir -p $O
$D/up.sh tapnbd >/dev/null || { echo UP FAILED; $D/down.sh; exit 1; }
P=$(cat $D/server.pid)
/work/wt-bonnie/.venv/bin/py-spy record -p $P -r 250 -f raw -o $O/tapnbd.folded --threads --nonblocking > $O/py-spy.log 2>&1 &
PS=$!; sleep 1
nocache bonnie++ -d $D/mnt -s 2048 -r 512 -n 0 -u root -q -m tapnbd 2>/dev/null | tail -1 | awk -F, '{print "tapnbd write",$12,"rewrite",$14,"read",$18,"seeks",$20}'
kill -INT $PS; wait $PS
$D/down.sh >/dev/null
