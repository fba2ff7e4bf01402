#!/bin/bash
# A/B: tapnbd (env A vs env B) and nbdkit, interleaved, fio nbd engine.
# usage: ab.sh VENV RW BS QD REPEAT "ENV_A" "ENV_B"
VENV=$1 RW=$2 BS=$3 QD=$4 REP=$5 EA=$6 EB=$7
IMG=/var/tmp/ab.img
[ -e $IMG ] || { dd if=/dev/urandom of=$IMG bs=1M count=1024 status=none; }
cat $IMG > /dev/null
run_fio() { fio --name=j --ioengine=nbd --uri=$1 --rw=$RW --bs=$BS --iodepth=$QD --size=1g --time_based --runtime=4 --group_reporting --output-format=json 2>/dev/null | python3 -c "
import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find('{'):])['jobs'][0]; s=d['write' if '$RW'.endswith('write') else 'read']; print(round(s['bw_bytes']/2**20) if '$BS'!='4k' else round(s['iops']))"; }
tap() { env $1 $VENV/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1 & P=$!; for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done; echo -n "$(run_fio nbd://127.0.0.1:10899/) "; kill $P; wait $P 2>/dev/null; }
nk() { nbdkit -f -p 10898 -i 127.0.0.1 file $IMG & P=$!; for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10898/ >/dev/null 2>&1 && break; sleep 0.1; done; echo -n "$(run_fio nbd://127.0.0.1:10898/) "; kill $P; wait $P 2>/dev/null; }
for r in $(seq $REP); do echo -n "A: "; tap "$EA"; echo -n " B: "; tap "$EB"; echo -n " nbdkit: "; nk; echo; done
