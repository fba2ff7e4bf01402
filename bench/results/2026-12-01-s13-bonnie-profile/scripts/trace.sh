#!/bin/bash
# trace.sh SERVER OUTDIR: up, perf record tracepoints during bonnie, down
D=/var/tmp/bon; S=$1; O=$2; mkdir -p $O
$D/up.sh $S >/dev/null || { echo UP FAILED; $D/down.sh; exit 1; }
mountpoint -q $D/mnt || { echo NOT MOUNTED; exit 1; }
DEV=$(basename $(cat $D/dev)); echo server=$(cat $D/server.pid) fuse=$(cat $D/fuse.pid) dev=$DEV > $O/pids
perf record -a -q -o $O/perf.data \
  -e 'syscalls:sys_enter_pread64' -e 'syscalls:sys_exit_pread64' \
  -e 'syscalls:sys_enter_preadv' -e 'syscalls:sys_exit_preadv' \
  -e 'syscalls:sys_enter_preadv2' -e 'syscalls:sys_exit_preadv2' \
  -e 'syscalls:sys_enter_pwrite64' -e 'syscalls:sys_exit_pwrite64' \
  -e 'syscalls:sys_enter_pwritev' -e 'syscalls:sys_exit_pwritev' \
  -e 'syscalls:sys_enter_pwritev2' -e 'syscalls:sys_exit_pwritev2' \
  -e 'block:block_rq_issue' -e 'block:block_rq_complete' \
  -e 'fuse:fuse_request_send' -e 'fuse:fuse_request_end' &
PP=$!; sleep 1
nocache bonnie++ -d $D/mnt -s 2048 -r 512 -n 0 -u root -q -m $S 2>/dev/null | tail -1 > $O/bonnie.csv
kill -INT $PP; wait $PP
cat $O/bonnie.csv | awk -F, '{print "'$S' write",$12,"rewrite",$14,"read",$18}'
$D/down.sh >/dev/null
cp $D/stats.json $O/ 2>/dev/null
