#!/bin/bash
# schedcell.sh V: 4k QD1 reads, server on CPU 0 and fio on CPU 1, perf sched for 2 s
RAW=/var/tmp/rw/fio/fio-random.raw; SOCK=/var/tmp/rw/qd.sock; rm -f $SOCK
URI="nbd+unix:///?socket=$SOCK"
case $1 in
 nk) taskset -c 0 nbdkit -f -U $SOCK file "$RAW" & P=$!;;
 tap) taskset -c 0 /work/main/.venv/bin/python -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!;;
esac
for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
taskset -c 1 fio --name=r --ioengine=nbd --uri="$URI" --rw=read --bs=4k --iodepth=1 --size=1g --time_based --runtime=4 --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print "IOPS", $8}' &
F=$!
sleep 1
perf sched record -q -o /var/tmp/rw/sched-$1.data -- sleep 2 >/dev/null 2>&1
wait $F; kill $P; wait $P 2>/dev/null
perf sched latency -i /var/tmp/rw/sched-$1.data --sort max 2>/dev/null | grep -E "fio|nbdkit|python|Task" | head -8
