import re, subprocess, sys, collections
d = sys.argv[1]; step = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
pids = dict(kv.split("=") for kv in open(f"{d}/pids").read().split()); server = int(pids["server"])
out = subprocess.run(["perf", "script", "-i", f"{d}/perf.data", "-F", "pid,tid,time,event,trace"], capture_output=True, text=True).stdout
rx = re.compile(r"^\s*(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")
op: dict[int, tuple[str, float]] = {}
b: collections.defaultdict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
T0: float | None = None
for line in out.splitlines():
    m = rx.match(line)
    if not m: continue
    pid, tid, t, name, rest = int(m[1]), int(m[2]), float(m[3]), m[4], m[5]
    if pid != server or not name.startswith("syscalls:"): continue
    if "enter" in name: op[tid] = ("r" if "read" in name else "w", t)
    elif tid in op:
        k, t0 = op.pop(tid); mm = re.search(r"0x([0-9a-f]+)", rest); n = int(mm[1], 16) if mm else 0
        if n > 1 << 40: continue
        T0 = T0 or t0; s = int((t0 - T0) / step)
        b[s][k + "b"] += n; b[s][k + "n"] += 1; b[s][k + "small"] += n < 131072
for s in sorted(b):
    c = b[s]
    print(f"{s*step:6.1f}s read {c['rb']/2**20/step:7.0f} MiB/s n={c['rn']:5d} small={c['rsmall']:5d}   write {c['wb']/2**20/step:7.0f} MiB/s n={c['wn']:5d}")
