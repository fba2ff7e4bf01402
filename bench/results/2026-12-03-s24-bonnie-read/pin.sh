#!/bin/bash
# pin.sh V CPUS_SERVER CPUS_FIO BS: one 3 s sequential READ cell at queue depth 1 over a unix
# socket (fio nbd engine), server and fio pinned with taskset; prints IOPS.
RAW=/var/tmp/rw/fio/fio-random.raw; SOCK=/var/tmp/rw/qd.sock; rm -f $SOCK
URI="nbd+unix:///?socket=$SOCK"
case $1 in
 nk) taskset -c $2 nbdkit -f -U $SOCK file "$RAW" & P=$!;;
 tap) taskset -c $2 /work/main/.venv/bin/python -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!;;
esac
for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
r=$(taskset -c $3 fio --name=r --ioengine=nbd --uri="$URI" --rw=read --bs=$4 --iodepth=1 --size=1g --time_based --runtime=3 --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print $8}')
kill $P; wait $P 2>/dev/null
echo "$1 srv=$2 fio=$3 bs=$4 IOPS $r"
