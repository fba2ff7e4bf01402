"""Print a py-spy speedscope file's self and inclusive shares per thread.

Usage: python ss.py FILE.speedscope.json [N]
"""

import collections
import json
import sys
from typing import Any


def main() -> None:
    d: dict[str, Any] = json.load(open(sys.argv[1]))
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    frames: list[dict[str, Any]] = d["shared"]["frames"]

    def name(i: int) -> str:
        f = frames[i]
        return f"{f['name']} ({(f.get('file') or '').split('/')[-1]}:{f.get('line')})"

    for p in d["profiles"]:
        total = sum(p["weights"])
        if total == 0:
            continue
        own: collections.Counter[int] = collections.Counter()
        incl: collections.Counter[int] = collections.Counter()
        for stack, w in zip(p["samples"], p["weights"]):
            if not stack:
                continue
            own[stack[-1]] += w
            for f in set(stack):
                incl[f] += w
        print("== thread", p["name"], "samples", total)
        print(" self:")
        for i, w in own.most_common(n):
            print(f"  {w / total * 100:5.1f}% {name(i)}")
        print(" incl:")
        for i, w in incl.most_common(n):
            print(f"  {w / total * 100:5.1f}% {name(i)}")


if __name__ == "__main__":
    main()
