#!/bin/bash
# fio over a unix socket, variants rotated each round. VARIANTS: "name=TREE:ENV=V,ENV=V" or nk
IMG=/var/tmp/rw/a.raw; S=/var/tmp/rw/u.sock; RW=${RW:-write}; BS=${BS:-1M}
read -ra VS <<< "$VARIANTS"
n=${#VS[@]}
for r in $(seq ${ROUNDS:-6}); do
  for i in $(seq 0 $((n-1))); do
    v=${VS[$(( (i + r) % n ))]}
    rm -f $S; sync; echo 1 > /proc/sys/vm/drop_caches
    if [ "$v" = nk ]; then nbdkit -f -U $S file $IMG & P=$!; U="nbd+unix:///?socket=$S"
    else
      name=${v%%=*}; rest=${v#*=}; tree=${rest%%:*}; envs=${rest#*:}; [ "$envs" = "$rest" ] && envs=
      env ${envs//,/ } PYTHONPATH=$tree /work/main/.venv/bin/python -m tapnbd serve --format raw -k $S a=$IMG >/dev/null 2>&1 & P=$!; U="nbd+unix:///a?socket=$S"
    fi
    for j in $(seq 100); do nbdinfo --size "$U" >/dev/null 2>&1 && break; sleep 0.05; done
    out=$(fio --name=w --ioengine=nbd --uri="$U" --rw=$RW --bs=$BS --iodepth=${QD:-8} --numjobs=${JOBS:-1} --group_reporting --size=1G --runtime=4 --time_based --output-format=json 2>/dev/null | python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print(int(j['write']['bw']/1024))")
    cpu=$(awk '{print $14+$15}' /proc/$P/stat)
    echo "$r ${v%%=*} $out cpu=$cpu"
    kill -INT $P; wait $P 2>/dev/null
  done
done
