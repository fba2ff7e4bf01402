#!/bin/bash
# A/B/nbdkit, rotated per round; fio nbd engine over TCP; prints MiB/s (IOPS for 4k) and server CPU us/MiB (us/op for 4k).
# usage: ab15.sh VENV RW BS QD ROUNDS "ENV_A" "ENV_B"
VENV=$1 RW=$2 BS=$3 QD=$4 REP=$5 EA=$6 EB=$7
IMG=/var/tmp/ab.img
cat $IMG > /dev/null
one() { # $1 = label, $2 = pid, $3 = uri
  local T0 T1 OUT
  T0=$(ps -L -o time= -p $2 >/dev/null; awk '{print $14+$15}' /proc/$2/stat)
  OUT=$(fio --name=j --ioengine=nbd --uri=$3 --rw=$RW --bs=$BS --iodepth=$QD --size=1g --time_based --runtime=4 --group_reporting --output-format=json 2>/dev/null)
  T1=$(awk '{print $14+$15}' /proc/$2/stat)
  echo "$OUT" | python3 /work/runs/s15/fiosum.py "$1" $RW $BS $(echo "($T1-$T0)/100" | bc -l)
}
tap() { env $2 $VENV/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10899 >/dev/null 2>&1 & local P=$!; for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10899/ >/dev/null 2>&1 && break; sleep 0.1; done; one "$1" $P nbd://127.0.0.1:10899/; kill $P; wait $P 2>/dev/null; }
nk() { nbdkit -f -p 10898 -i 127.0.0.1 file $IMG & local P=$!; for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10898/ >/dev/null 2>&1 && break; sleep 0.1; done; one nbdkit $P nbd://127.0.0.1:10898/; kill $P; wait $P 2>/dev/null; }
for r in $(seq $REP); do
  case $((r % 3)) in
    1) tap A "$EA"; tap B "$EB"; nk;;
    2) tap B "$EB"; nk; tap A "$EA";;
    0) nk; tap A "$EA"; tap B "$EB";;
  esac
  echo "--"
done
