#!/bin/bash
# repcell.sh VARIANT: a 7 s fio seq write 1M QD8 cell on the raw image (pages dropped first), with the KiB of free memory the guest reported to the host (virtio-balloon free page reporting) during it
v=$1; RAW=/var/tmp/rw/a.raw; PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10897/
R=/sys/module/page_reporting/parameters/reported_kib
(cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" "$RAW")
env=; [ "$v" = tapnosplice ] && env=TAPNBD_SPLICE=0
if [ "$v" = nk ]; then nbdkit -f -p 10897 -i 127.0.0.1 file "$RAW" & P=$!
else env $env $PY -m tapnbd serve "$RAW" --format raw --bind 127.0.0.1 --port 10897 >/dev/null 2>&1 & P=$!; fi
for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
sleep 3  # what the drop freed is reported before the cell
a=$(cat $R)
bw=$(fio --name=j --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1g --time_based --runtime=7 --group_reporting 2>/dev/null | grep -o 'BW=[0-9]*MiB/s')
b=$(cat $R)
echo "$v $bw reported during the cell: $(( (b - a) / 1024 )) MiB"
kill $P; wait $P 2>/dev/null
