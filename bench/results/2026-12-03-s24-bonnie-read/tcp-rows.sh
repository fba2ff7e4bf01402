#!/bin/bash
# tcp-rows.sh ROUNDS RW BS QD: the goal run's fio cell over TCP (4 s), tapnbd raw without
# and with --poll-us 50, order alternating; IOPS or MiB/s per cell.
RAW=${RAW:-/var/tmp/rw/fio/fio-random.raw}; PY=/work/main/.venv/bin/python
URI=nbd://127.0.0.1:10899/
for r in $(seq 0 $(($1 - 1))); do
  vs=(plain poll); [ $((r % 2)) = 1 ] && vs=(poll plain)
  for v in "${vs[@]}"; do
    (cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), sys.argv[2] in ('write', 'randwrite'))" "$RAW" "$2")
    extra=(); [ $v = poll ] && extra=(--poll-us 50)
    $PY -m tapnbd serve "$RAW" --format raw --bind 127.0.0.1 --port 10899 "${extra[@]}" >/dev/null 2>&1 & P=$!
    for k in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
    out=$(fio --name=j --ioengine=nbd --uri=$URI --rw=$2 --bs=$3 --iodepth=$4 --size=1g \
      --time_based --runtime=4 --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print $7/1024, $8, $48/1024, $49}')
    kill $P; wait $P 2>/dev/null
    echo "$r $v $2 read-MiB/s,read-IOPS,write-MiB/s,write-IOPS: $out"
  done
done
