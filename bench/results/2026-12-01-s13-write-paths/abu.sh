#!/bin/bash
# unix-socket A/B: tapnbd env A, env B, nbdkit; fio nbd engine. args: VENV RW BS QD REP EA EB
VENV=$1 RW=$2 BS=$3 QD=$4 REP=$5 EA=$6 EB=$7
IMG=/var/tmp/ab.img; S=/tmp/abu.sock
run_fio() { fio --name=j --ioengine=nbd --uri="nbd+unix:///?socket=$S" --rw=$RW --bs=$BS --iodepth=$QD --size=1g --time_based --runtime=4 --group_reporting --output-format=json 2>/dev/null | python3 -c "
import json,sys; t=sys.stdin.read(); d=json.loads(t[t.find('{'):])['jobs'][0]; s=d['write' if '$RW'.endswith('write') else 'read']; print(round(s['bw_bytes']/2**20))"; }
wait_up() { for i in $(seq 100); do nbdinfo --size "nbd+unix:///?socket=$S" >/dev/null 2>&1 && break; sleep 0.1; done; }
tap() { rm -f $S; env $1 $VENV/bin/python -m tapnbd serve $IMG --format raw --socket $S >/dev/null 2>&1 & P=$!; wait_up; echo -n "$(run_fio) "; kill $P; wait $P 2>/dev/null; }
nk() { rm -f $S; nbdkit -f -U $S file $IMG & P=$!; wait_up; echo -n "$(run_fio) "; kill $P; wait $P 2>/dev/null; }
for r in $(seq $REP); do echo -n "A: "; tap "$EA"; echo -n " B: "; tap "$EB"; echo -n " nbdkit: "; nk; echo; done
