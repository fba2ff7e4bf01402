#!/bin/bash
# clients.sh ROUNDS JOBS BS VARIANT...: JOBS fio jobs, each its own connection with one
# READ at a time (or $QD; rand read, or $RW, BS), over a unix socket, the image warm in the page cache.
# One 4 s cell per variant per round, order rotated. Prints "round variant IOPS".
#   nk: nbdkit file; tap: tapnbd raw (this tree); tapinline: no I/O threads; tappoll: this tree, --poll-us $POLL_US;
#   env@VAR=VALUE: the tree in $EXPDIR (an experiment) with VAR=VALUE in its environment;
#   tree@DIR: the tree in DIR (a worktree of another version);
#   poll@DIR: the tree in DIR, --poll-us $POLL_US (a worktree of another version).
set -e
ROUNDS=$1; JOBS=$2; BS=$3; shift 3
RAW=${RAW:-/var/tmp/rw/fio/fio-random.raw}; SOCK=/var/tmp/rw/clients.sock
PY=/work/main/.venv/bin/python; TREE=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
vs=("$@")
for r in $(seq 0 $((ROUNDS - 1))); do
  for i in $(seq 0 $((${#vs[@]} - 1))); do
    v=${vs[$(( (i + r) % ${#vs[@]} ))]}
    cat "$RAW" > /dev/null
    rm -f $SOCK
    case $v in
      nk) nbdkit -f -U $SOCK file "$RAW" & P=$!;;
      tap) (cd "$TREE" && exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK) >/dev/null 2>&1 & P=$!;;
      tapinline) (cd "$TREE" && TAPNBD_IO_THREADS=0 exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK) >/dev/null 2>&1 & P=$!;;
      tappoll) (cd "$TREE" && exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK --poll-us ${POLL_US:-50}) >/dev/null 2>&1 & P=$!;;
      env@*) e=${v#env@}; (cd "${EXPDIR:-/work/wt-exp}" && exec env $e $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK) >/dev/null 2>&1 & P=$!;;
      tree@*) (cd "${v#tree@}" && exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK) >/dev/null 2>&1 & P=$!;;
      poll@*) (cd "${v#poll@}" && exec $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK --poll-us ${POLL_US:-50}) >/dev/null 2>&1 & P=$!;;
    esac
    URI="nbd+unix:///?socket=$SOCK"
    for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
    iops=$(fio --name=r --ioengine=nbd --uri="$URI" --rw=${RW:-randread} --bs=$BS --iodepth=${QD:-1} \
      --numjobs=$JOBS --group_reporting --size=1g --time_based --runtime=4 \
      --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print $8}')
    kill $P; wait $P 2>/dev/null || true
    echo "$r $v $iops"
  done
done
