#!/bin/bash
# seq write cell (4 s, 1M QD8) through tapnbd on IMG FMT after dropping its pages
IMG=$1; FMT=$2
cd /work/main
.venv/bin/python -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" $IMG
.venv/bin/python -m tapnbd serve --format $FMT --port 10930 x=$IMG >/dev/null 2>&1 & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10930/x >/dev/null 2>&1 && break; sleep 0.05; done
fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:10930/x --rw=write --bs=1M --iodepth=8 --size=1G --runtime=4 --time_based --output-format=terse 2>/dev/null | awk -F';' '{print "MiB/s", $48/1024}'
kill $P; wait $P
.venv/bin/python -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), False)" $IMG
