#!/bin/bash
# usage: up.sh tapnbd|nbdkit   -> sets up img, server, nbdfuse, loop (dio), ext4 at /var/tmp/bon36/mnt
set -e
trap "echo up.sh failed >&2" ERR
S=$1; D=/var/tmp/bon36
rm -f $D/img.raw; truncate -s 6G $D/img.raw
rm -f $D/nbd.sock
if [ $S = tapnbd -o $S = proto ]; then
  if [ $S = proto ]; then export PYTHONPATH=/work/pw36 PROTO_ARRIVEWRITE=${PROTO_ARRIVEWRITE:-1}; else export PYTHONPATH=/work/main; fi
  setsid /work/main/.venv/bin/python -m tapnbd serve $D/img.raw --format raw --socket $D/nbd.sock --stats-file $D/stats.json $TAPNBD_ARGS > $D/server.out 2>$D/server.err &
  echo $! > $D/server.pid
  URI="nbd+unix:///img.raw?socket=$D/nbd.sock"
else
  rm -f $D/server.pid; nbdkit -P $D/server.pid -U $D/nbd.sock file file=$D/img.raw $NBDKIT_ARGS > $D/server.out 2>$D/server.err
  URI="nbd+unix:///?socket=$D/nbd.sock"
fi
for i in $(seq 100); do [ -S $D/nbd.sock ] && break; sleep 0.1; done
sleep 0.5
mkdir -p $D/fuse $D/mnt
rm -f $D/fuse.pid
nbdfuse -P $D/fuse.pid $D/fuse/nbd "$URI" &
for i in $(seq 100); do [ -s $D/fuse.pid ] && break; sleep 0.1; done
DEV=$(losetup --find --show $D/fuse/nbd); echo $DEV > $D/dev
losetup --direct-io=on $DEV
if [ -z "$NOMKFS" ]; then
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard $DEV
mount -t ext4 $DEV $D/mnt
fi
sync; echo 3 > /proc/sys/vm/drop_caches
echo up $S $DEV server=$(cat $D/server.pid) fuse=$(cat $D/fuse.pid)
