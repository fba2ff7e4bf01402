# Hooks for session 21's fuse.sh, which sources this file when HOOK names it; MODE picks:
#   cpu:      the server's and nbdfuse's CPU ticks over the dd, the machine's /proc/stat
#             columns, and the MiB the guest reported free to the host meanwhile;
#   syscalls: the server's write, splice and receive calls (enter and exit tracepoints),
#             into /var/tmp/rw/sys-KIND.data, for syscalls.py;
#   bdp:      writeback:balance_dirty_pages over the whole machine, into
#             /var/tmp/rw/bdp-KIND.data (perf script prints nothing: nothing throttled).
# e.g. HOOK=$PWD/hooks.sh MODE=cpu bash ../2026-12-02-s21-bonnie/fuse.sh tap
case $MODE in
cpu)
  hook_start() {
    C0=$(head -1 /proc/stat); N0=$(awk "{print \$14+\$15}" /proc/$F/stat)
    R0=$(cat /sys/module/page_reporting/parameters/reported_kib)
  }
  hook_stop() {
    C1=$(head -1 /proc/stat); N1=$(awk "{print \$14+\$15}" /proc/$F/stat)
    R1=$(cat /sys/module/page_reporting/parameters/reported_kib)
    python3 -c "import sys; a=list(map(int,sys.argv[1].split()[1:])); b=list(map(int,sys.argv[2].split()[1:])); d=[y-x for x,y in zip(a,b)]; print('server', $S1-$S0, 'nbdfuse', $N1-$N0, 'user nice sys idle iowait irq softirq steal', d[:8], 'reportedMiB', ($R1-$R0)//1024, 'secs %.1f' % ($T1-$T0))" "$C0" "$C1"
  };;
syscalls|bdp)
  if [ "$MODE" = bdp ]; then
    EV=writeback:balance_dirty_pages
  else
    EV=""
    for n in pwrite64 pwritev pwritev2 splice recvfrom recvmsg read; do
      EV="$EV${EV:+,}syscalls:sys_enter_$n,syscalls:sys_exit_$n"
    done
  fi
  hook_start() {
    if [ "$MODE" = bdp ]; then WHO=-a; else WHO="-p $P"; fi  # P: the server, by now
    perf record -q -e "$EV" $WHO -o /var/tmp/rw/$MODE-$KIND.data >/dev/null 2>&1 & HR=$!
    sleep 0.5  # perf attaches before dd starts
  }
  hook_stop() { kill -INT $HR; wait $HR; };;
esac
