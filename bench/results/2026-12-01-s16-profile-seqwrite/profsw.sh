#!/bin/bash
OUT=$1; IMG=/var/tmp/rw/a.raw; mkdir -p $OUT
for srv in tap nk; do
  python3 /var/tmp/rw/drop.py $IMG
  if [ $srv = tap ]; then TAPNBD_SPLICE=${SPLICE:-1} /work/main/.venv/bin/python -m tapnbd serve $IMG --format raw --bind 127.0.0.1 --port 10898 >/dev/null 2>&1 & P=$!
  else nbdkit -f -p 10898 -i 127.0.0.1 file $IMG & P=$!; fi
  for i in $(seq 100); do nbdinfo --size nbd://127.0.0.1:10898/ >/dev/null 2>&1 && break; sleep 0.1; done
  fio --name=j --ioengine=nbd --uri=nbd://127.0.0.1:10898/ --rw=write --bs=1M --iodepth=8 --size=1g \
      --time_based --runtime=7 --group_reporting 2>/dev/null | grep -E "IOPS=|cpu" > $OUT/$srv-fio.txt &
  F=$!
  sleep 1.5
  perf record -q -a -g -F 999 -o $OUT/$srv.data -- sleep 4 >/dev/null 2>&1
  wait $F; kill $P; wait $P 2>/dev/null
  perf report -i $OUT/$srv.data --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null \
      | grep -E "^ +[0-9]" | head -70 > $OUT/$srv-profile.txt
  perf report -i $OUT/$srv.data --no-children --sort comm --stdio -g none 2>/dev/null \
      | grep -E "^ +[0-9]" | head -12 > $OUT/$srv-by-command.txt
  perf report -i $OUT/$srv.data --no-children --sort comm,dso --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" | head -12 > $OUT/$srv-by-dso.txt
  perf report -i $OUT/$srv.data --children --comm python --sort sym --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" | head -60 > $OUT/$srv-children.txt
  rm -f $OUT/$srv.data
done
