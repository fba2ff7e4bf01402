"""``make mutate``: mutation testing of the core modules, one mutant at a time.

Each mutant is one small change to one module's syntax tree: a comparison flipped
(``<`` and ``<=``, ``==`` and ``!=``, ``in`` and ``not in``, ...), an arithmetic or bit
operator swapped, ``and`` and ``or`` swapped, a ``not`` dropped, a constant changed
(``n`` to ``n + 1``, ``True`` and ``False``), or a statement that only calls something
deleted (``await self.child.flush()``: the kind of line a refactoring loses). The
module is rewritten in a scratch copy of the checkout, never in the checkout itself,
and the tests that cover it run there with a timeout; a mutant is *killed* when they
fail (or hang), and *survives* when they pass. The score is killed / all.

    python -m tests.mutate [MODULE ...] [--budget SECONDS] [--max N] [--seed S]
                           [--function NAME] [--list]

Each target module has a fast subset of tests (TARGETS). Mutants are tried in a
seeded random order until the budget or ``--max`` runs out; survivors are printed
with their line, to be explained or killed by a new test.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Module -> the tests that should catch a change to it (fast ones: seconds each).
TARGETS: dict[str, list[str]] = {
    "tapnbd/backend.py": [
        "tests/drivers/test_contract.py",
        "tests/drivers/test_backend_rules.py",
        "tests/reliability/test_filters.py",
    ],
    "tapnbd/protocol/transmission.py": [
        "tests/protocol/test_transmission.py",
        "tests/protocol/test_transmission_edges.py",
    ],
    "tapnbd/protocol/handshake.py": [
        "tests/protocol/test_handshake.py",
        "tests/protocol/test_tls_required.py",
    ],
    "formats/qcow/driver.py": [
        "tests/formats/test_qcow_driver.py",
        "tests/formats/test_qcow_flush_retry.py",
        "tests/formats/test_qcow_geometry.py",
        "tests/reliability/test_powerloss.py",
    ],
    "tapnbd/xen/blkif.py": ["tests/xen/test_blkif_abi.py", "tests/xen/test_codec.py"],
    # The grant checks and persistent grants (use --function _page_of, map_segments, ...).
    "tapnbd/xen/grant.py": [
        "tests/xen/test_grant_map.py",
        "tests/xen/test_codec.py",
        "tests/xen/test_ring_persistent.py",
        "tests/xen/test_fast_path.py",
    ],
    # blkback's fast path (use --function _serve_fast).
    "tapnbd/xen/blkback.py": ["tests/xen/test_fast_path.py", "tests/xen/test_batching.py"],
    "formats/vhd/driver.py": [
        "tests/formats/test_vhd_read.py::test_partial_sector_write_copies_nothing",
        "tests/formats/test_vhd_read.py::test_block_sizes_read_by_qemu",
        "tests/formats/test_vhd_write.py::test_power_cuts",
    ],
    "formats/vhd/meta.py": [
        "tests/formats/test_vhd_corrupt.py",
        "tests/formats/test_vhd_read.py::test_batmap_is_read",
    ],
    # Control auth: the SO_PEERCRED check (use --function _client, or peer_uid).
    "tapnbd/control/daemon.py": [
        "tests/control/test_peercred.py",
        "tests/control/test_daemon.py::test_control_socket_is_owner_only",
    ],
}

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.Mod: ast.FloorDiv,
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the index-th mutation site of the module, in tree order
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what}"


class _Mutator(ast.NodeTransformer):
    """Numbers the mutation sites in tree order; changes site ``target`` (if >= 0)."""

    def __init__(self, target: int, lines: tuple[int, int] | None) -> None:
        self.target = target
        self.lines = lines
        self.sites: list[tuple[int, str]] = []
        self.done = False

    def _site(self, node: ast.AST, what: str) -> bool:
        """Register a site; True when it is the one to change."""
        line = getattr(node, "lineno", 0)
        if self.lines is not None and not self.lines[0] <= line <= self.lines[1]:
            return False
        self.sites.append((line, what))
        hit = len(self.sites) - 1 == self.target
        self.done = self.done or hit
        return hit

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        # Docstrings and annotations are not behaviour: only the body's statements.
        node.body = [self.visit(s) for s in node.body]
        return node

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        node.body = [self.visit(s) for s in node.body]
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is not None and self._site(node, f"{_name(op)} -> {_name(swap())}"):
                node.ops[i] = swap()
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = _BIN_SWAP.get(type(node.op))
        if swap is not None and self._site(node, f"{_name(node.op)} -> {_name(swap())}"):
            node.op = swap()
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        swap = _BIN_SWAP.get(type(node.op))
        if swap is not None and self._site(node, f"{_name(node.op)}= -> {_name(swap())}="):
            node.op = swap()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        if self._site(node, f"{_name(node.op)} -> {_name(other)}"):
            node.op = other
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._site(node, "drop not"):
            return node.operand
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        v = node.value
        if isinstance(v, bool):
            if self._site(node, f"{v} -> {not v}"):
                return ast.copy_location(ast.Constant(not v), node)
        elif isinstance(v, int) and self._site(node, f"{v} -> {v + 1}"):
            return ast.copy_location(ast.Constant(v + 1), node)
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        call = node.value.value if isinstance(node.value, ast.Await) else node.value
        if isinstance(call, ast.Call) and self._site(node, f"delete `{ast.unparse(node)}`"):
            return ast.copy_location(ast.Pass(), node)
        return node


def _name(op: ast.AST) -> str:
    return {
        "Lt": "<",
        "LtE": "<=",
        "Gt": ">",
        "GtE": ">=",
        "Eq": "==",
        "NotEq": "!=",
        "In": "in",
        "NotIn": "not in",
        "Is": "is",
        "IsNot": "is not",
        "Add": "+",
        "Sub": "-",
        "Mult": "*",
        "FloorDiv": "//",
        "BitAnd": "&",
        "BitOr": "|",
        "LShift": "<<",
        "RShift": ">>",
        "Mod": "%",
        "And": "and",
        "Or": "or",
    }.get(type(op).__name__, type(op).__name__)


def _span(tree: ast.Module, function: str | None) -> tuple[int, int] | None:
    if function is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return node.lineno, node.end_lineno or node.lineno
    raise SystemExit(f"no function {function!r}")


def mutants(module: str, function: str | None = None) -> list[Mutant]:
    tree = ast.parse((ROOT / module).read_text())
    m = _Mutator(-1, _span(tree, function))
    m.visit(tree)
    return [Mutant(module, i, line, what) for i, (line, what) in enumerate(m.sites)]


def mutated_source(module: str, index: int, function: str | None = None) -> str:
    tree = ast.parse((ROOT / module).read_text())
    m = _Mutator(index, _span(tree, function))
    new = m.visit(copy.deepcopy(tree))
    assert m.done, f"no site {index} in {module}"
    return ast.unparse(ast.fix_missing_locations(new))


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    how: str  # failed | timeout | survived
    seconds: float


def _scratch() -> Path:
    """A copy of the checkout (sources and tests, no venv, no bytecode)."""
    tmp = Path(tempfile.mkdtemp(prefix="tapnbd-mutate-"))
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "__pycache__",
        "*.pyc",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "var",
        "results",
        "*.egg-info",
    )
    for part in ("tapnbd", "formats", "tests", "bench", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp / part, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, tmp / part)
    return tmp


def _pytest(scratch: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(scratch)}
    env.setdefault("TAPNBD_TEST_SEED", "1")  # the same random tests for every mutant
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0
    return ("survived" if proc.returncode == 0 else "failed"), time.monotonic() - t0


def run(
    module: str, budget: float, limit: int, seed: int, function: str | None
) -> Iterator[Outcome]:
    tests = TARGETS[module]
    scratch = _scratch()
    target = scratch / module
    original = target.read_text()
    try:
        how, base = _pytest(scratch, tests, 600)
        if how != "survived":
            raise SystemExit(f"{module}: the tests fail without any mutant ({how})")
        timeout = 3 * base + 15
        order = mutants(module, function)
        random.Random(seed).shuffle(order)
        deadline = time.monotonic() + budget
        for n, mutant in enumerate(order):
            if n >= limit or time.monotonic() > deadline:
                break
            target.write_text(mutated_source(module, mutant.index, function))
            try:
                how, seconds = _pytest(scratch, tests, timeout)
            finally:
                target.write_text(original)
            yield Outcome(mutant, how != "survived", how, seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    ap.add_argument("--budget", type=float, default=600, help="seconds per module")
    ap.add_argument("--max", type=int, default=1 << 30, help="mutants per module")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--function", help="only mutate inside this function")
    ap.add_argument("--list", action="store_true", help="list the mutants and stop")
    a = ap.parse_args(argv)
    modules = a.modules or list(TARGETS)
    for module in modules:
        if module not in TARGETS:
            raise SystemExit(f"{module}: no tests are named for it in TARGETS")
    total = killed = 0
    for module in modules:
        if a.list:
            for m in mutants(module, a.function):
                print(m)
            continue
        sites = len(mutants(module, a.function))
        print(f"{module}: {sites} mutants; tests: {' '.join(TARGETS[module])}", flush=True)
        survivors: list[Outcome] = []
        n = k = 0
        for out in run(module, a.budget, a.max, a.seed, a.function):
            n += 1
            k += out.killed
            if not out.killed:
                survivors.append(out)
            print(
                f"  {'killed ' if out.killed else 'SURVIVED'} ({out.how}, "
                f"{out.seconds:.1f} s) {out.mutant}",
                flush=True,
            )
        total += n
        killed += k
        print(f"{module}: {k}/{n} killed ({100 * k / max(n, 1):.0f}%), {sites - n} not tried")
        lines = (ROOT / module).read_text().splitlines()
        for out in survivors:
            print(f"  survivor {out.mutant}\n      {lines[out.mutant.line - 1].strip()}")
    if not a.list:
        print(f"score: {killed}/{total} ({100 * killed / max(total, 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
