import atexit, collections, sys
from tapnbd import stats
orig = stats.Stats.settle
hist: collections.Counter[int] = collections.Counter()
def settle(self, t0):
    hist[len(self.inline_reads) + len(self.inline_writes)] += 1
    orig(self, t0)
stats.Stats.settle = settle
def dump():
    n = sum(hist.values()); reqs = sum(k * v for k, v in hist.items())
    with open("/tmp/statsrun/batches.txt", "w") as f:
        print(f"batches {n} requests {reqs} mean {reqs / max(n, 1):.2f}", file=f)
        for k in sorted(hist): print(k, hist[k], file=f)
atexit.register(dump)
from tapnbd.cli import main
sys.argv[0] = "tapnbd"
sys.exit(main())
