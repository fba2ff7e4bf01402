import subprocess, sys, collections
d, t0, t1, comm = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
out = subprocess.run(["perf", "script", "-i", f"{d}/perf.data", "--time", f"{t0},{t1}", "--comms", comm, "-F", "tid,event,ip,sym"], capture_output=True, text=True).stdout
leaf: collections.Counter[str] = collections.Counter()
incl: collections.Counter[str] = collections.Counter()
n = 0
for block in out.split("\n\n"):
    lines = block.strip().splitlines()
    if not lines or "cpu-clock" not in lines[0]: continue
    n += 1
    syms = [l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "?" for l in lines[1:]]
    if syms: leaf[syms[0]] += 1
    for s in set(syms): incl[s] += 1
print("samples", n)
print("-- self"); [print(f"{v/n*100:5.1f}% {k}") for k, v in leaf.most_common(int(sys.argv[5]) if len(sys.argv) > 5 else 25)]
print("-- inclusive"); [print(f"{v/n*100:5.1f}% {k}") for k, v in incl.most_common(int(sys.argv[6]) if len(sys.argv) > 6 else 40)]
