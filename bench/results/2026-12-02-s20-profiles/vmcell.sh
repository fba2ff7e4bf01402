#!/bin/bash
# vmcell.sh JOB VARIANT: one 7 s fio cell, with /proc/vmstat deltas (refaults, page-ins) and DAMON's paged-out bytes across it
JOB=$1; v=$2
RAW=${RAW:-/var/tmp/rw/a.raw}; QCOW=${QCOW:-/var/tmp/rw/s19/o.qcow}
PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10897/
case $JOB in write) FIO="--rw=write --bs=1M --iodepth=8";; randwrite) FIO="--rw=randwrite --bs=4k --iodepth=32";; randread) FIO="--rw=randread --bs=4k --iodepth=32";; seqread) FIO="--rw=read --bs=1M --iodepth=8";; esac
img=$RAW; fmt=raw; env=
[ "$v" = tapqcow ] && { img=$QCOW; fmt=qcow; }
[ "$v" = tapnostats ] && env=TAPNBD_STATS=off
(cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), sys.argv[2] in ('write','randwrite'))" "$img" "$JOB")
if [ "$v" = nk ]; then nbdkit -f -p 10897 -i 127.0.0.1 file "$img" & P=$!
else env $env $PY -m tapnbd serve "$img" --format $fmt --bind 127.0.0.1 --port 10897 >/dev/null 2>&1 & P=$!; fi
for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
K=/sys/kernel/mm/damon/admin/kdamonds/0; S=$K/contexts/0/schemes/0/stats/sz_applied
snap() { echo update_schemes_stats > $K/state; echo "$(grep -E '^(workingset_refault_file|pgpgin|pgpgout) ' /proc/vmstat | awk '{print $2}' | tr '\n' ' ') $(cat $S)"; }
a=$(snap)
fio --name=j --ioengine=nbd --uri=$URI $FIO --size=1g --time_based --runtime=7 --group_reporting 2>/dev/null | grep -E "IOPS=" 
b=$(snap)
kill $P; wait $P 2>/dev/null
python3 -c "
a=list(map(int,'$a'.split())); b=list(map(int,'$b'.split()))
n=['refault_file','pgpgin_KiB','pgpgout_KiB','damon_paged_out_B']
print('  ', ', '.join(f'{k} +{y-x}' for k,x,y in zip(n,a,b)))"
