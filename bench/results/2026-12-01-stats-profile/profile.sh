#!/bin/sh
# Two-sided profile of statistics on and off under fio rand read 4k QD32 (issue 15, item 3).
# usage: profile.sh VENV_BIN IMAGE OUTDIR   (IMAGE: a raw file warm in the page cache)
set -eu
BIN=$1 IMG=$2 OUT=$3
mkdir -p "$OUT"
for mode in on off; do
    sock=$OUT/nbd-$mode.sock; rm -f "$sock"
    TAPNBD_STATS=$mode "$BIN/tapnbd" serve "$IMG" --format raw --socket "$sock" \
        > "$OUT/uri-$mode.txt" 2> "$OUT/server-$mode.log" &
    pid=$!
    while ! grep -q nbd "$OUT/uri-$mode.txt" 2>/dev/null; do sleep 0.1; done
    uri=$(grep nbd "$OUT/uri-$mode.txt")
    "$BIN/py-spy" record -r 997 --native --threads --pid "$pid" --duration 8 --format raw \
        -o "$OUT/server-$mode.folded" > "$OUT/py-spy-$mode.log" 2>&1 &
    spy=$!
    perf record -g -F 997 -o "$OUT/fio-$mode.perf.data" -- \
        fio --name=j --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 \
            --size=256m --time_based --runtime=8 --output-format=json \
        > "$OUT/fio-$mode.json" 2> "$OUT/perf-$mode.log"
    wait "$spy" || true
    kill -TERM "$pid"; wait "$pid" || true
    perf report -i "$OUT/fio-$mode.perf.data" --stdio --no-children --percent-limit 1 \
        > "$OUT/fio-$mode.perf.txt" 2>/dev/null
    rm -f "$OUT/fio-$mode.perf.data" "$sock" "$OUT/uri-$mode.txt"
done
