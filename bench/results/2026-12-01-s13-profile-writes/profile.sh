#!/bin/bash
# perf of both sides, tapnbd serve and fio's nbd engine, for one fio job.
# usage: profile.sh OUT RW BS QD   (a 1 GiB raw image at /var/tmp/ab.img, warm)
OUT=$1 RW=$2 BS=$3 QD=$4 IMG=/var/tmp/ab.img
.venv/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10894 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10894/ >/dev/null 2>&1 && break; sleep 0.1; done
fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10894/ --rw=$RW --bs=$BS --iodepth=$QD \
    --size=1g --time_based --runtime=6 --group_reporting > $OUT-fio.txt 2>&1 &
W=$!
sleep 1
F=$(pgrep -n -x fio)
perf record -q -F 2000 -g -o $OUT-server.data -p $P -- sleep 4 >/dev/null 2>&1 &
S=$!
perf record -q -F 2000 -g -o $OUT-client.data -p $F -- sleep 4 >/dev/null 2>&1
wait $S $W
kill $P; wait $P 2>/dev/null
for side in server client; do
    perf report -i $OUT-$side.data --no-children --sort dso,sym --stdio -g none 2>/dev/null \
        | grep -E "^ +[0-9]" | head -25 > $OUT-$side.txt
    rm -f $OUT-$side.data
done
