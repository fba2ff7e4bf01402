#!/bin/bash
# perf -g of the server only during a seq write cell; callers of __pi_memcpy
cd /work/main
.venv/bin/python -c "import sys; from pathlib import Path; from bench.proc import ready_for; ready_for(Path(sys.argv[1]), True)" /var/tmp/rw/a.raw
env $1 PYTHONPATH=${TAPDIR:-/work/main} .venv/bin/python -m tapnbd serve --format raw --port 10940 x=/var/tmp/rw/a.raw >/dev/null 2>/var/tmp/rw/pm.err & P=$!
for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10940/x >/dev/null 2>&1 && break; sleep 0.05; done
fio --name=w --ioengine=nbd --uri=nbd://127.0.0.1:10940/x --rw=write --bs=1M --iodepth=8 --size=1G --runtime=6 --time_based --output-format=terse 2>/dev/null | awk -F';' '{print "MiB/s", $48/1024}' &
F=$!
sleep 1
perf record -q -g -p $P -o /var/tmp/rw/pm.data -- sleep 3 >/dev/null 2>&1
wait $F; kill $P; wait $P
perf report -i /var/tmp/rw/pm.data --stdio --no-children -S __pi_memcpy -G 2>/dev/null | grep -v "^#" | grep -v "^$" | head -40
perf report -i /var/tmp/rw/pm.data --stdio --no-children --sort sym 2>/dev/null | grep -E "^ +[0-9]" | head -8
grep SPLICED /var/tmp/rw/pm.err
t=$(perf report -i /var/tmp/rw/pm.data --stdio --no-children --sort comm 2>/dev/null | grep -c .); 
perf script -i /var/tmp/rw/pm.data -F period 2>/dev/null | awk '{s+=$1} END{print "samples-period", s}'
