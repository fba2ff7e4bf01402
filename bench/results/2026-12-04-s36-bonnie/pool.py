"""Tap raw / nbdkit file per round, block columns, over Bonnie result directories:

    python3 pool.py DIR... (each with a bonnie.csv)
"""

import csv, statistics as st, sys
allr = {"write": [], "read": []}
for d in sys.argv[1:]:
    rows = list(csv.DictReader(open(d + "/bonnie.csv")))
    by = {}
    for r in rows:
        by.setdefault(int(r["round"]), {})[r["row"]] = r
    rr = {"write": [], "read": []}
    for k in sorted(by):
        t, n = by[k].get("tap-raw"), by[k].get("nbdkit-file")
        if not t or not n: continue
        for c in rr:
            rr[c].append(float(t[c + "_kps"]) / float(n[c + "_kps"]))
    for c in rr:
        allr[c] += rr[c]
    print(d, {c: (len(v), round(st.median(v), 3)) for c, v in rr.items()})
for c, v in allr.items():
    print("pooled", c, len(v), round(st.median(v), 3), "at>=1.0:", sum(x >= 1.0 for x in v))
