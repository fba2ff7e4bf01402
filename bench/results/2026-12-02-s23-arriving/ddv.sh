#!/bin/bash
# dd 2 GiB through ext4/loop(direct)/nbdfuse, variants rotated: "name=TREE:ENV=V,..." or nk
FUSE=/work/main/bench/results/2026-12-02-s21-bonnie/fuse.sh
read -ra VS <<< "$VARIANTS"; n=${#VS[@]}
for r in $(seq ${ROUNDS:-5}); do
  for i in $(seq 0 $((n-1))); do
    v=${VS[$(( (i + r) % n ))]}
    if [ "$v" = nk ]; then out=$(bash $FUSE nk 2>&1)
    else name=${v%%=*}; rest=${v#*=}; tree=${rest%%:*}; envs=${rest#*:}; [ "$envs" = "$rest" ] && envs=
      out=$(env ${envs//,/ } PYTHONPATH=$tree bash $FUSE tap 2>&1); fi
    echo "$r ${v%%=*} $(echo "$out" | grep copied | awk '{print $(NF-1)}') MB/s, $(echo "$out" | grep 'server cpu' | awk '{print $3}') ticks"
  done
done
