#!/bin/bash
# cells.sh OUT N VARIANT...: N rounds of one seq write cell (1M QD8, 4 s, as the goal
# run's) per variant, each recorded by `perf record -g` on the server process alone and
# by `perf stat` of the machine's context switches; MiB/s and the server's CPU per cell.
#   VARIANT: tap (tapnbd raw), nk (nbdkit file). Image: $RAW (the goal run's raw image).
set -e
OUT=$1; N=$2; shift 2
RAW=${RAW:-/var/tmp/rw/fio/fio-random.raw}
PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10898/
mkdir -p "$OUT"
for r in $(seq "$N"); do
  for v in "$@"; do
    (cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" "$RAW")
    sync
    if [ "$v" = nk ]; then nbdkit -f -p 10898 -i 127.0.0.1 file "$RAW" & P=$!
    else $PY -m tapnbd serve "$RAW" --format raw --bind 127.0.0.1 --port 10898 >/dev/null 2>&1 & P=$!; fi
    for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
    perf record -q -g -F 499 -p $P -o "$OUT/$v-$r.data" >/dev/null 2>&1 & Q=$!
    t0=$(awk '{print $14+$15}' /proc/$P/stat)
    mib=$(fio --name=j --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1g \
        --time_based --runtime=4 --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print $48/1024}')
    t1=$(awk '{print $14+$15}' /proc/$P/stat)
    kill -INT $Q; wait $Q 2>/dev/null || true
    kill $P; wait $P 2>/dev/null || true
    echo "$r $v MiB/s $mib server-ticks $((t1 - t0))" | tee -a "$OUT/cells.txt"
  done
done
