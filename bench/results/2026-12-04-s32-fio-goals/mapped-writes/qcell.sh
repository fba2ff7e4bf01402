#!/bin/bash
# qcell.sh TREE PORT: one 4 s seq write cell on /var/tmp/qq/${IMG:-q}.qcow through tapnbd of TREE
tree=$1; port=$2
sync; echo 1 > /proc/sys/vm/drop_caches
PYTHONPATH=$tree $tree/.venv/bin/python -m tapnbd serve --format qcow --port $port q=/var/tmp/qq/${IMG:-q}.qcow > /dev/null 2>&1 &
for i in $(seq 50); do nbdinfo --size nbd://127.0.0.1:$port/q >/dev/null 2>&1 && break; sleep 0.1; done
bw=$(fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:$port/q --rw=write --bs=1M --iodepth=8 --size=1G --runtime=4 --time_based --output-format=json 2>/dev/null | python3 -c 'import json,sys; s=sys.stdin.read(); print(int(json.loads(s[s.index("{"):])["jobs"][0]["write"]["bw"]/1024))')
pkill -f "port $port"; wait
echo "$tree $bw"
