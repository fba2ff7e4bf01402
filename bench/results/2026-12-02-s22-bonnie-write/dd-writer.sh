#!/bin/bash
# dd through the nbdfuse stack (session 21's fuse.sh), five rounds of: tapnbd as on main
# (big WRITEs copied inline on the loop), tapnbd with bigwrite.diff and BIGPOOL=262144
# (WRITEs of 256 KiB and more copied by one writer thread), nbdkit file. Prints MB/s.
#   git worktree add /work/wt-pool HEAD && git -C /work/wt-pool apply $PWD/bigwrite.diff
#   PYTHONPATH=/work/wt-pool bash dd-writer.sh
FUSE=$(dirname "$0")/../2026-12-02-s21-bonnie/fuse.sh
for r in 1 2 3 4 5; do
  for k in inline w1 nk; do
    case $k in inline) K=tap; B=0;; w1) K=tap; B=262144;; nk) K=nk; B=0;; esac
    echo "== round $r $k $(BIGPOOL=$B BIGW=1 bash "$FUSE" $K 2>&1 | grep copied | awk '{print $(NF-1)}')"
  done
done
