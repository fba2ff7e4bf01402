#!/bin/bash
KIND=$1; IMG=/var/tmp/rw/a.raw; PORT=10912; OUT=/work/runs/prof-$KIND
sync; echo 1 > /proc/sys/vm/drop_caches
if [ "$KIND" = nk ]; then nbdkit -f -p $PORT -i 127.0.0.1 file $IMG & P=$!; URI=nbd://127.0.0.1:$PORT/
else PYTHONPATH=/work/main /work/main/.venv/bin/python -m tapnbd serve --format raw --port $PORT a=$IMG >/dev/null 2>&1 & P=$!; URI=nbd://127.0.0.1:$PORT/a; fi
for i in $(seq 100); do nbdinfo --size $URI >/dev/null 2>&1 && break; sleep 0.1; done
perf record -q -F 999 -a -o $OUT.data >/dev/null 2>&1 & Q=$!
fio --name=w --ioengine=nbd --uri=$URI --rw=write --bs=1M --iodepth=8 --size=1G --runtime=4 --time_based --output-format=terse | awk -F';' 'NF > 48 {print "MiB/s", $48/1024, "total MiB", $47/1024}'
kill -INT $Q; wait $Q; kill $P; wait $P 2>/dev/null
perf report -i $OUT.data --sort comm,dso --stdio 2>/dev/null | grep -v "^#" | grep -v "^$" | head -14
