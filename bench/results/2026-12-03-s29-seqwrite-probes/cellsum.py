import collections
import statistics as st
import sys

rows: dict[int, dict[str, tuple[float, float, float]]] = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    p=line.split()
    if len(p)>=8 and p[0].isdigit():
        rows[int(p[0])][p[1]]=(float(p[2]),float(p[5]),float(p[7]))
kinds=sorted({k for r in rows.values() for k in r})
ref=sys.argv[2] if len(sys.argv)>2 else "nk"
for k in kinds:
    v=[r[k][0] for r in rows.values() if k in r]
    f=[r[k][1] for r in rows.values() if k in r]
    s=[r[k][2] for r in rows.values() if k in r]
    rat=[r[k][0]/r[ref][0] for r in rows.values() if k in r and ref in r]
    print(f"{k:28s} n={len(v)} MiB/s med {st.median(v):.0f} fio_us {st.median(f):.0f} srv_us {st.median(s):.0f} ratio/{ref} med {st.median(rat):.3f}")
