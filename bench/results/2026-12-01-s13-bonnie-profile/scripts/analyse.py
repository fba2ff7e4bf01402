"""Summarise a trace.sh perf.data: what the server sees, per bonnie phase (by second)."""
import collections, re, subprocess, sys, statistics

d = sys.argv[1]
pids = dict(kv.split("=") for kv in open(f"{d}/pids").read().split())
server = int(pids["server"])
out = subprocess.run(["perf", "script", "-i", f"{d}/perf.data", "-F", "comm,pid,tid,time,event,trace"],
                     capture_output=True, text=True).stdout
rx = re.compile(r"^\s*(\S.*?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)$")
open_sys = {}  # tid -> (t, kind, count)
ev = []  # (t0, t1, kind, bytes, tid)
fuse_open = {}; fuse_iv = []
blk_open = {}; blk_iv = []
for line in out.splitlines():
    m = rx.match(line)
    if not m: continue
    comm, pid, tid, t, name, rest = m.groups(); pid, tid, t = int(pid), int(tid), float(t)
    if name.startswith("syscalls:sys_enter_p"):
        if pid != server: continue
        kind = "read" if "read" in name else "write"
        cnt = 0
        mm = re.search(r"count: (0x[0-9a-f]+)", rest)
        if mm: cnt = int(mm.group(1), 16)
        mm = re.search(r"vlen: (0x[0-9a-f]+)", rest)
        open_sys[tid] = (t, kind, cnt)
    elif name.startswith("syscalls:sys_exit_p"):
        if pid != server or tid not in open_sys: continue
        t0, kind, cnt = open_sys.pop(tid)
        mm = re.search(r"0x([0-9a-f]+)", rest)
        ret = int(mm.group(1), 16) if mm else 0
        if ret > 1 << 40: ret = 0
        ev.append((t0, t, kind, ret, tid))
    elif name == "fuse:fuse_request_send":
        mm = re.search(r"req (\d+) opcode \d+ \((\w+)\)", rest)
        if mm: fuse_open[mm.group(1)] = (t, mm.group(2))
    elif name == "fuse:fuse_request_end":
        mm = re.search(r"req (\d+)", rest)
        if mm and mm.group(1) in fuse_open:
            t0, op = fuse_open.pop(mm.group(1)); fuse_iv.append((t0, t, op))
    elif name == "block:block_rq_issue" and rest.startswith(pids["dev_mm"] if "dev_mm" in pids else "7,"):
        mm = re.match(r"(\d+,\d+) (\S+) (\d+) \(.*?\) (\d+) \+ (\d+)", rest)
        if mm: blk_open[(mm.group(1), mm.group(4))] = (t, mm.group(2), int(mm.group(5)) * 512)
    elif name == "block:block_rq_complete" and rest.startswith("7,"):
        mm = re.match(r"(\d+,\d+) (\S+) \(.*?\) (\d+) \+ (\d+)", rest)
        if mm and (mm.group(1), mm.group(3)) in blk_open:
            t0, rw, n = blk_open.pop((mm.group(1), mm.group(3))); blk_iv.append((t0, t, rw, n))

if not ev: sys.exit("no server syscalls")
T0 = min(e[0] for e in ev)
# phase per second: by the server's bytes
sec: collections.defaultdict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
for t0, t1, k, n, _ in ev:
    sec[int(t0 - T0)][0 if k == "read" else 1] += n
WIN = [float(x) for x in sys.argv[2].split(":")] if len(sys.argv) > 2 else None
def phase(t: float) -> str:
    if WIN: return "window" if WIN[0] <= t - T0 < WIN[1] else "idle"
    r, w = sec.get(int(t - T0), (0, 0))
    if r + w < 20 << 20: return "idle"
    return "read" if r > 3 * w else ("write" if w > 3 * r else "mixed")
def occupancy(iv: list[tuple[float, float]] | list[tuple[float, float, str]] | list[tuple[float, float, str, int]]) -> float:  # time-averaged number in flight, over the intervals' span
    if not iv: return 0.0
    span = max(x[1] for x in iv) - min(x[0] for x in iv)
    return sum(x[1] - x[0] for x in iv) / span if span else 0.0
secs = collections.Counter(phase(T0 + s + 0.5) for s in sec)
print("seconds per phase:", dict(secs))
for ph in ("write", "mixed", "read", "window"):
    E = [e for e in ev if phase(e[0]) == ph]
    if not E: continue
    dur = sum(1 for s in sec if phase(T0 + s + 0.5) == ph)
    print(f"== {ph} phase ({dur} s)")
    for k in ("read", "write"):
        K = [e for e in E if e[2] == k]
        if not K: continue
        sizes: collections.Counter[str] = collections.Counter()
        for e in K:
            n = e[3]; b = "<128K" if n < 128 << 10 else ("<512K" if n < 512 << 10 else ("<1M" if n < 1 << 20 else "1M"))
            sizes[b] += 1
        lat = [ (e[1]-e[0])*1e6 for e in K]
        print(f"  server p{k}: {len(K)} calls, {sum(e[3] for e in K)/2**20:.0f} MiB, avg {statistics.mean(e[3] for e in K)/1024:.0f} KiB {dict(sizes)}; "
              f"us median {statistics.median(lat):.0f} mean {statistics.mean(lat):.0f}; threads {len(set(e[4] for e in K))}; "
              f"in-syscall occupancy {occupancy([(e[0], e[1]) for e in K]):.2f}")
    F = [f for f in fuse_iv if phase(f[0]) == ph]
    for op in ("FUSE_READ", "FUSE_WRITE"):
        X = [f for f in F if f[2] == op]
        if X:
            lat = [(f[1]-f[0])*1e6 for f in X]
            q = statistics.quantiles(lat, n=10) if len(lat) > 1 else [lat[0]] * 9
            print(f"  fuse {op}: {len(X)} reqs, in flight (time avg) {occupancy(X):.2f}, us median {statistics.median(lat):.0f} mean {statistics.mean(lat):.0f} p10 {q[0]:.0f} p90 {q[-1]:.0f}")
    B = [b for b in blk_iv if phase(b[0]) == ph]
    for rw in ("R", "W"):
        XB = [b for b in B if b[2].startswith(rw)]
        if XB:
            lat = [(b[1]-b[0])*1e6 for b in XB]
            print(f"  loop {rw}: {len(XB)} rqs avg {statistics.mean(b[3] for b in XB)/1024:.0f} KiB, in flight {occupancy(XB):.2f}, us median {statistics.median(lat):.0f}")
