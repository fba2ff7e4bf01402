#!/bin/bash
# main vs s14p vs nbdkit, rotated order. args: RW BS QD ROUNDS
RW=$1; BS=$2; QD=$3; N=$4
for r in $(seq $N); do
  case $((r % 3)) in 1) order="main s14p nk";; 2) order="s14p nk main";; 0) order="nk main s14p";; esac
  for v in $order; do
    sync
    case $v in main) VENV=/work/main/.venv bash /work/runs/cpuu.sh tap $RW $BS $QD main;;
               s14p) VENV=/work/wt-s14p/.venv bash /work/runs/cpuu.sh tap $RW $BS $QD s14p;;
               nk) bash /work/runs/cpuu.sh nk $RW $BS $QD nk;; esac
  done
done
