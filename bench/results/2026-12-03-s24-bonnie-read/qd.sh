#!/bin/bash
# qd.sh ROUNDS BS QD VARIANT...: sequential READs of BS at queue depth QD over a unix
# socket (fio's nbd engine), the image warm in the page cache: the requests nbdfuse
# sends for Bonnie's block read. One 4 s cell per variant per round, order rotated.
#   VARIANT: nk (nbdkit file), tap (tapnbd raw), tapinline (TAPNBD_IO_THREADS=0),
#   tapproto (the tree in $POLLDIR, poll.diff's prototype, with TAPNBD_POLL_US=$POLL_US),
#   tappoll (tapnbd serve --poll-us $POLL_US, default 50)
set -e
ROUNDS=$1; BS=$2; QD=$3; shift 3
RAW=${RAW:-/var/tmp/rw/fio/fio-random.raw}; SOCK=/var/tmp/rw/qd.sock
PY=/work/main/.venv/bin/python
vs=("$@")
for r in $(seq 0 $((ROUNDS - 1))); do
  for i in $(seq 0 $((${#vs[@]} - 1))); do
    v=${vs[$(( (i + r) % ${#vs[@]} ))]}
    cat "$RAW" > /dev/null
    rm -f $SOCK
    case $v in
      nk) nbdkit -f -U $SOCK file "$RAW" & P=$!; URI="nbd+unix:///?socket=$SOCK";;
      tap) $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!; URI="nbd+unix:///?socket=$SOCK";;
      tapinline) TAPNBD_IO_THREADS=0 $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!; URI="nbd+unix:///?socket=$SOCK";;
      tappoll) $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK --poll-us ${POLL_US:-50} >/dev/null 2>&1 & P=$!; URI="nbd+unix:///?socket=$SOCK";;
      tapproto) PYTHONPATH=${POLLDIR:-/work/wt-poll} TAPNBD_POLL_US=${POLL_US:-50} $PY -m tapnbd serve "$RAW" --format raw --socket $SOCK >/dev/null 2>&1 & P=$!; URI="nbd+unix:///?socket=$SOCK";;
    esac
    for k in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
    mib=$(fio --name=r --ioengine=nbd --uri="$URI" --rw=read --bs=$BS --iodepth=$QD --size=1g \
      --time_based --runtime=4 --output-format=terse 2>/dev/null | awk -F';' 'NF > 48 {print $7/1024}')
    kill $P; wait $P 2>/dev/null || true
    echo "$r $v $mib"
  done
done
