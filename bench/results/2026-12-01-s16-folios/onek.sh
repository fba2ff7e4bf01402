#!/bin/bash
img=$1; rw=${2:-randwrite}; bs=${3:-4k}; qd=${4:-32}
sync
nbdkit -f -i 127.0.0.1 -p 10888 file "$img" > /var/tmp/rw/kuri.txt 2>/var/tmp/rw/kserve.log &
pid=$!
sleep 1
uri=nbd://127.0.0.1:10888/
fio --name=x --ioengine=nbd --uri=$uri --rw=$rw --bs=$bs --iodepth=$qd --size=1g --time_based --runtime=4 --output-format=json 2>&1 | python3 -c "import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find(chr(123)):]); j=d['jobs'][0]; s=j['write' if 'write' in '$rw' else 'read']; print('nbdkit $img $rw', round(s['iops']), 'iops', round(s['bw_bytes']/2**20),'MiB/s')"
kill $pid; wait $pid
