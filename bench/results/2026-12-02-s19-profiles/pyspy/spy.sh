#!/bin/bash
# spy.sh OUT VARIANT: py-spy (collapsed stacks) of the server under fio rand write 4k QD32.
OUT=$1; v=$2  # e.g. spy.sh randwrite tap (session 19 wrote rw-*, renamed randwrite-* here); PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10897/
img=/var/tmp/rw/a.raw; fmt=raw; [ "$v" = tapqcow ] && { img=/var/tmp/rw/s19/o.qcow; fmt=qcow; }
(cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" "$img")
$PY -m tapnbd serve "$img" --format $fmt --bind 127.0.0.1 --port 10897 >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
fio --name=j --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=32 --size=1g --time_based --runtime=7 2>/dev/null | grep -E "IOPS=" > $OUT-$v-fio.txt &
F=$!
sleep 1.5
/work/main/.venv/bin/py-spy record --nonblocking -r 200 -d 4 -f raw -o $OUT-$v.txt -p $P >/dev/null 2>&1
wait $F; kill $P; wait $P 2>/dev/null
