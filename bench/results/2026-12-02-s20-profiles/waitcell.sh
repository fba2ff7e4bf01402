#!/bin/bash
# waitcell.sh WAIT VARIANT: a 7 s fio seq write 1M QD8 cell on the raw image, WAIT seconds after its pages were dropped
W=$1; v=$2; RAW=/var/tmp/rw/a.raw; PY=/work/main/.venv/bin/python; URI=nbd://127.0.0.1:10897/
(cd /work/main && $PY -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" "$RAW")
if [ "$v" = nk ]; then nbdkit -f -p 10897 -i 127.0.0.1 file "$RAW" & P=$!
else $PY -m tapnbd serve "$RAW" --format raw --bind 127.0.0.1 --port 10897 >/dev/null 2>&1 & P=$!; fi
for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
sleep "$W"
echo "wait $W $v $(fio --name=j --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1g --time_based --runtime=7 --group_reporting 2>/dev/null | grep -o 'BW=[0-9]*MiB/s')"
kill $P; wait $P 2>/dev/null
