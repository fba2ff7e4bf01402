"""``python -m tests.fuzz TARGET``: run a fuzz target for a number of inputs.

Targets: ``nbd`` (tests.fuzz.nbd_codec) and ``qcow`` (tests.fuzz.qcow_mutate).

The nbd target is coverage-guided with atheris (libFuzzer) when it is installed
(``pip install -e '.[fuzz]'``); otherwise, or with ``--engine random``, seeds are
mutated at random by tests.fuzz.source.mutate. ``make fuzz`` runs both targets with
FUZZ_RUNS inputs each. A failing input is written to var/fuzz/ and the run stops; add it
to tests/fuzz/regressions/ so that pytest replays it from then on.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ARTIFACTS = Path("var/fuzz")


def run_random(target: Callable[[bytes], None], seeds: list[bytes], runs: int, seed: int) -> int:
    """Mutate seeds for ``runs`` inputs; inputs that reached new outcomes join the pool."""
    from tests.fuzz.source import mutate

    rng = random.Random(seed)
    pool = list(seeds)
    t0 = time.monotonic()
    for n in range(1, runs + 1):
        data = mutate(rng.choice(pool), rng)
        try:
            target(data)
        except BaseException:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            path = ARTIFACTS / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"crash after {n} inputs; input saved to {path}", file=sys.stderr)
            raise
        if len(pool) < 4096 and rng.random() < 0.01:
            pool.append(data)
        if n % 100_000 == 0:
            print(f"#{n} inputs, {n / (time.monotonic() - t0):.0f}/s", file=sys.stderr)
    return runs


def run_atheris(runs: int, max_len: int) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    # Only the codec is instrumented: coverage of the harness itself is noise.
    with atheris.instrument_imports(include=["tapnbd"]):
        from tests.fuzz import nbd_codec
    corpus = Path(tempfile.mkdtemp(prefix="tapnbd-fuzz-"))
    for i, s in enumerate(nbd_codec.seeds()):
        (corpus / f"seed{i}").write_bytes(s)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0],
        f"-runs={runs}",
        f"-max_len={max_len}",
        "-rss_limit_mb=1024",  # memory must stay bounded: libFuzzer fails the run past it
        "-timeout=10",  # no input may hang
        "-print_final_stats=1",
        f"-artifact_prefix={ARTIFACTS}/",
        str(corpus),
    ]
    atheris.Setup(args, nbd_codec.one_input)
    atheris.Fuzz()  # exits the process


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz")
    p.add_argument("target", choices=["nbd", "qcow"])
    p.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "100000")))
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=4096)
    a = p.parse_args()
    if a.target == "qcow":
        from tests.fuzz import qcow_mutate

        # The driver logs each bad table it meets; thousands of mutants would flood the
        # output. (Only here: under pytest, other tests read those log lines.)
        logging.getLogger("formats.qcow").setLevel(logging.ERROR)

        t0 = time.monotonic()
        stats = qcow_mutate.campaign(a.runs, seed=a.seed)
        print(f"qcow: {stats.summary()}, in {time.monotonic() - t0:.0f} s")
        return
    engine = a.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    if engine == "atheris":
        run_atheris(a.runs, a.max_len)  # never returns
    from tests.fuzz import nbd_codec

    t0 = time.monotonic()
    n = run_random(nbd_codec.one_input, nbd_codec.seeds(), a.runs, a.seed)
    print(f"nbd: {n} inputs, no failure, in {time.monotonic() - t0:.0f} s (random mutation)")


if __name__ == "__main__":
    main()
