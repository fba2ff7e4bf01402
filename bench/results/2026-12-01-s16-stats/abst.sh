#!/bin/bash
# abst.sh RW BS QD N: tapnbd with statistics on and off (TAPNBD_STATS), alternating order,
# 4 s fio cells over TCP on /var/tmp/rw/b.raw (pages dropped before write cells, warm for reads).
RW=$1; BS=$2; QD=$3; N=$4; IMG=/var/tmp/rw/b.raw
servers=(on off)
for r in $(seq 0 $((N-1))); do
  for k in 0 1; do
    s=${servers[$(( (r + k) % 2 ))]}
    python3 /var/tmp/rw/drop.py $IMG
    case $RW in *read*) python3 -c "
f=open('$IMG','rb',buffering=0)
while f.read(8<<20): pass";; esac
    (cd /work/main && TAPNBD_STATS=$s exec /work/main/.venv/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1) & P=$!
    for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done
    v=$(fio --name=x --ioengine=nbd --uri=nbd://127.0.0.1:10899/ --rw=$RW --bs=$BS --iodepth=$QD --size=1g --time_based --runtime=4 --output-format=json 2>&1 | python3 -c "import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find(chr(123)):]); j=d['jobs'][0]; s=j['write' if 'write' in '$RW' else 'read']; print(round(s['iops']) if '$BS'=='4k' else round(s['bw_bytes']/2**20))")
    echo "$r $s $v"
    kill $P; wait $P 2>/dev/null
  done
done
