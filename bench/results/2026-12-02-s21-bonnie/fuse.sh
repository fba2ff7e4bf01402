#!/bin/bash
# ext4 on loop (direct I/O) on nbdfuse on a server; dd 2 GiB with fsync; prints MB/s and the
# server's CPU. PERF=1: perf -g of the server for 5 s of it; PERF=all: of the whole machine.
# KIND: tap (tapnbd serve --format raw), tapp (probed), nk (nbdkit file)
# HOOK=FILE (session 22): sourced; its hook_start runs just before dd, hook_stop after.
[ -n "$HOOK" ] && source "$HOOK"
KIND=$1; IMG=/var/tmp/rw/fz.raw; M=/var/tmp/rw/fz; mkdir -p $M/fuse $M/mnt
rm -f $M/pid $M/sock; rm -f $IMG; truncate -s 4G $IMG; rm -f /var/tmp/rw/fz.json
case $KIND in
  nk) nbdkit -f -U $M/sock file $IMG & P=$!; URI="nbd+unix:///?socket=$M/sock";;
  tap) /work/main/.venv/bin/tapnbd serve --format raw -k $M/sock --stats-file /var/tmp/rw/fz.json a=$IMG >/dev/null 2>&1 & P=$!; URI="nbd+unix:///a?socket=$M/sock";;
  tapp) /work/main/.venv/bin/tapnbd serve -k $M/sock --stats-file /var/tmp/rw/fz.json a=$IMG >/dev/null 2>&1 & P=$!; URI="nbd+unix:///a?socket=$M/sock";;
esac
for i in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.05; done
nbdfuse -P $M/pid $M/fuse/nbd "$URI" & F=$!
for i in $(seq 100); do [ -s $M/pid ] && break; sleep 0.05; done
D=$(losetup --find --show --direct-io=on $M/fuse/nbd)
mkfs.ext4 -q -F $D; mount $D $M/mnt
if [ "$PERF" = all ]; then W="-a"; else W="-p $P"; fi  # all: the whole machine (nbdfuse, kworkers)
[ -n "$PERF" ] && { perf record -q -g $W -o /var/tmp/rw/fz.data -- sleep 5 >/dev/null 2>&1 & R=$!; }
[ -n "$HOOK" ] && hook_start
S0=$(awk "{print \$14+\$15}" /proc/$P/stat); T0=$(date +%s.%N)
dd if=/dev/zero of=$M/mnt/f bs=1M count=2048 conv=fsync 2>&1 | tail -1
S1=$(awk "{print \$14+\$15}" /proc/$P/stat); T1=$(date +%s.%N); echo "server cpu $(( S1 - S0 )) ticks over $(echo "$T1 - $T0" | bc) s"; [ -n "$R" ] && wait $R
[ -n "$HOOK" ] && hook_stop
umount $M/mnt; losetup -d $D
for i in $(seq 50); do losetup -j $M/fuse/nbd | grep -q . || break; sleep 0.1; done
fusermount3 -u $M/fuse 2>/dev/null || fusermount -u $M/fuse 2>/dev/null || umount $M/fuse
wait $F; kill -INT $P; wait $P
[ -f /var/tmp/rw/fz.json ] && python3 -c "
import json; d=json.load(open('/var/tmp/rw/fz.json'))['a']['ops']['write']; print('writes', d['ops'], 'max', d['max_bytes'], 'avg', d['bytes']//max(1,d['ops']))"
