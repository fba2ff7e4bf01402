#!/bin/bash
# profile.sh OUT JOB VARIANT...: whole-machine perf (server and fio) under one fio job,
# one 7 s cell per variant, recorded for 4 s in its middle. Session 16's profsw.sh
# (../2026-12-01-s16-profile-seqwrite) generalised to the jobs and variants of issue 15's
# missed goals.
#   JOB: write (seq write 1M QD8), read (seq read 1M QD8, added in session 24),
#   randwrite (rand write 4k QD32) or randread (rand
#   read 4k QD32)
#   VARIANT: tap (tapnbd raw), tapnostats (TAPNBD_STATS=off), tapqcow (tapnbd on the
#   optimised qcow image $QCOW, all allocated), nk (nbdkit file)
# Images: $RAW (1 GiB raw) and $QCOW (the same data in an optimised qcow). Write cells
# start with the image's pages dropped, read cells with them warm (bench.proc.ready_for).
set -e
OUT=$1; JOB=$2; shift 2
RAW=${RAW:-/var/tmp/rw/a.raw}; QCOW=${QCOW:-/var/tmp/rw/s19/o.qcow}
PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10897/
mkdir -p "$OUT"
case $JOB in
  write) FIO="--rw=write --bs=1M --iodepth=8";;
  randwrite) FIO="--rw=randwrite --bs=4k --iodepth=32";;
  randread) FIO="--rw=randread --bs=4k --iodepth=32";;
  read) FIO="--rw=read --bs=1M --iodepth=8";;
  *) echo "unknown job $JOB" >&2; exit 2;;
esac
for v in "$@"; do
  img=$RAW; fmt=raw; env=
  [ "$v" = tapqcow ] && { img=$QCOW; fmt=qcow; }
  [ "$v" = tapnostats ] && env=TAPNBD_STATS=off
  [ "$v" = tapnosplice ] && env=TAPNBD_SPLICE=0
  (cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), sys.argv[2] not in ('randread', 'read'))" "$img" "$JOB")
  if [ "$v" = nk ]; then nbdkit -f -p 10897 -i 127.0.0.1 file "$img" & P=$!
  else env $env $PY -m tapnbd serve "$img" --format $fmt --bind 127.0.0.1 --port 10897 >/dev/null 2>&1 & P=$!; fi
  for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
  fio --name=j --ioengine=nbd --uri=$URI $FIO --size=1g --time_based --runtime=7 \
      --group_reporting 2>/dev/null | grep -E "IOPS=|cpu" > "$OUT/$v-fio.txt" &
  F=$!
  sleep 1.5
  perf record -q -a -g -F 999 -o "$OUT/$v.data" -- sleep 4 >/dev/null 2>&1
  wait $F; kill $P; wait $P 2>/dev/null || true
  # shellcheck disable=SC2317
  rep() { perf report -i "$OUT/$v.data" --stdio -g none "$@" 2>/dev/null | grep -E "^ +[0-9]"; }
  rep --no-children --sort comm,dso,sym | head -70 > "$OUT/$v-profile.txt"
  rep --no-children --sort comm | head -12 > "$OUT/$v-by-command.txt"
  rep --no-children --sort comm,dso | head -12 > "$OUT/$v-by-dso.txt"
  rep --children --comm python --sort sym | head -60 > "$OUT/$v-children.txt"
  rm -f "$OUT/$v.data"
done
