import subprocess, sys, collections
f = sys.argv[1]
out = subprocess.run(["perf", "script", "-i", f, "-F", "tid,comm,ip,sym"], capture_output=True, text=True).stdout
leaf: collections.Counter[str] = collections.Counter()
incl: collections.Counter[str] = collections.Counter()
thr: collections.Counter[str] = collections.Counter()
n = 0
for block in out.split("\n\n"):
    lines = block.strip().splitlines()
    if not lines: continue
    n += 1; thr[lines[0].split()[0]] += 1
    syms = [l.split(None, 1)[1] if len(l.split(None, 1)) > 1 else "?" for l in lines[1:]]
    if syms: leaf[syms[0]] += 1
    for s in set(syms): incl[s] += 1
print("samples", n, "threads", thr.most_common(12))
print("-- self"); [print(f"{v/n*100:5.1f}% {k}") for k, v in leaf.most_common(int(sys.argv[2]))]
print("-- inclusive"); [print(f"{v/n*100:5.1f}% {k}") for k, v in incl.most_common(int(sys.argv[3]))]
