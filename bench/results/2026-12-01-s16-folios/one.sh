#!/bin/bash
# one.sh IMAGE FMT : serve with tapnbd on tcp, run fio randwrite 4k QD32 4s, print IOPS
img=$1; fmt=$2; rw=${3:-randwrite}; bs=${4:-4k}; qd=${5:-32}
sync
/work/main/.venv/bin/tapnbd serve "$img" --format $fmt --bind 127.0.0.1 --port 0 > /var/tmp/rw/uri.txt 2>/var/tmp/rw/serve.log &
pid=$!
for i in $(seq 100); do grep -q nbd /var/tmp/rw/uri.txt && break; sleep 0.1; done
uri=$(grep nbd /var/tmp/rw/uri.txt)
fio --name=x --ioengine=nbd --uri=$uri --rw=$rw --bs=$bs --iodepth=$qd --size=1g --time_based --runtime=4 --output-format=json 2>&1 | python3 -c "import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find(chr(123)):]); j=d['jobs'][0]; s=j['write' if 'write' in '$rw' else 'read']; print('$img $fmt $rw', round(s['iops']), 'iops', round(s['bw_bytes']/2**20),'MiB/s')"
kill $pid; wait $pid
