"""``tapnbd info``, ``map``, ``check`` and ``--version`` import only what they use (issue 15, CLI
start-up). The guard is the set of modules a real run leaves in ``sys.modules``, not a
wall-clock time, so it fails the same way on a loaded machine.

asyncio is imported by every image command: the drivers are coroutines (their tables
load through futures), so even ``info`` runs one short loop. uvloop is not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
sys.argv = ["tapnbd", *sys.argv[1:]]
from tapnbd.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

#: What no command on a local image pays for: typer 0.29's pydantic, uvloop, rich
#: (nothing is drawn), the daemon, attach, the server, the ring, the NBD client and the
#: remote drivers, ctypes (libc is loaded for fallocate only), and construct (a test
#: oracle for the layouts, about 34 ms to import).
NEVER = (
    "construct",
    "pydantic",
    "uvloop",
    "rich",
    "tapnbd.control",
    "tapnbd.server",
    "tapnbd.xen",
    "tapnbd.protocol",
    "tapnbd.cli.daemon",
    "tapnbd.cli.attach",
    "tapnbd.cli.serve",
    "tapnbd.cli.ring",
    "formats.nbd",
    "formats.rbd",
    "formats.ram",
    "ctypes",
)
#: Each format's package. raw is the file layer under every format, so it is always in.
PACKAGES = {"qcow": "formats.qcow", "qcow2": "formats.qcow2", "vhd": "formats.vhd"}
#: qemu-img's name for each format.
QEMU_NAME = {"raw": "raw", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vpc"}


def run_cli(*args: str) -> tuple[str, set[str]]:
    """The CLI's stdout, and every module it imported, from a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), proc.stderr
    return proc.stdout, set(report["modules"])


def loaded(mods: set[str], *packages: str) -> set[str]:
    """The modules of ``mods`` that are one of ``packages`` or inside one."""
    return {m for m in mods if any(m == p or m.startswith(p + ".") for p in packages)}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small image per format, made by qemu-img."""
    d = tmp_path_factory.mktemp("lazy")
    out = {}
    for fmt, qemu in QEMU_NAME.items():
        path = d / f"disk.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", qemu, str(path), "16M"], check=True)
        out[fmt] = path
    return out


def test_version_imports_no_command_module() -> None:
    out, mods = run_cli("--version")
    assert out.startswith("tapnbd ")
    assert not {m for m in mods if m.startswith("tapnbd.cli.") and m != "tapnbd.cli.app"}
    assert not loaded(mods, "formats", "asyncio", *NEVER)


@pytest.mark.parametrize("fmt", ["raw", "qcow", "qcow2", "vhd"])
def test_info_imports_only_the_opened_format(images: dict[str, Path], fmt: str) -> None:
    out, mods = run_cli("info", str(images[fmt]))
    assert f"file format: {fmt}\n" in out  # it did open and describe the image
    assert PACKAGES.get(fmt, "formats.raw") in mods
    others = [p for f, p in PACKAGES.items() if f != fmt]
    assert not loaded(mods, *NEVER, *others)
    # Nor the other image commands: typer inspects every registered command at start.
    assert not loaded(mods, "tapnbd.cli.image", "tapnbd.cli.inspect", "tapnbd.cli.image_edit")


@pytest.mark.parametrize("fmt", ["raw", "qcow", "qcow2", "vhd"])
def test_map_imports_only_the_opened_format(images: dict[str, Path], fmt: str) -> None:
    out, mods = run_cli("map", "--output=json", str(images[fmt]))
    assert json.loads(out)[0]["start"] == 0
    others = [p for f, p in PACKAGES.items() if f != fmt]
    assert not loaded(mods, *NEVER, *others)


@pytest.mark.parametrize("fmt", ["qcow", "qcow2", "vhd"])
def test_check_imports_only_the_checked_format(images: dict[str, Path], fmt: str) -> None:
    out, mods = run_cli("check", str(images[fmt]))
    assert "No errors were found on the image." in out
    others = [p for f, p in PACKAGES.items() if f != fmt]
    assert not loaded(mods, *NEVER, *others)


@pytest.mark.parametrize("fmt", ["raw", "qcow", "qcow2", "vhd"])
def test_create_imports_only_the_created_format(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"new.{fmt}"
    mods = run_cli("create", "-f", fmt, str(path), "--size", "16M")[1]
    made = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True
    )
    info = json.loads(made.stdout)
    assert (info["format"], info["virtual-size"]) == (QEMU_NAME[fmt], 16 << 20)
    others = [p for f, p in PACKAGES.items() if f != fmt]
    assert not loaded(mods, *NEVER, *others)


@pytest.mark.parametrize("out_fmt", ["raw", "qcow", "qcow2"])
def test_convert_imports_only_the_formats_it_uses(
    tmp_path: Path, images: dict[str, Path], out_fmt: str
) -> None:
    """A raw image copied to a raw, qcow or qcow2 one: no other format's module (qcow2's
    -o keys are read only when given) and no NBD client (an NBD URI is told by its
    name). The copy lives in formats.qcow, so that package is in, but not the QCOW
    driver unless the copy is to QCOW; so are uvloop (a copy runs on it) and ctypes
    (the first pooled read buffer asks it, to page-align it: tapnbd.buffers)."""
    dst = tmp_path / f"out.{out_fmt}"
    mods = run_cli("convert", "-q", "-f", "raw", "-O", out_fmt, str(images["raw"]), str(dst))[1]
    assert dst.exists()
    others = [p for f, p in PACKAGES.items() if f not in (out_fmt, "qcow")]
    assert not loaded(mods, *(m for m in NEVER if m not in ("ctypes", "uvloop")), *others)
    if out_fmt != "qcow":
        assert loaded(mods, "formats.qcow") == {"formats.qcow", "formats.qcow.convert"}


def test_probing_imports_no_driver(images: dict[str, Path]) -> None:
    # formats.probe scores magic bytes (formats/probes.py), reading them through raw's
    # checked open; the winner's module is imported only by open_image.
    code = (
        "import json, sys, formats\n"
        "names = [formats.probe(p) for p in sys.argv[1:]]\n"
        "print(json.dumps([names, sorted(sys.modules)]))"
    )
    paths = [str(images[f]) for f in QEMU_NAME]
    proc = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True
    )
    names, mods = json.loads(proc.stdout)
    assert names == list(QEMU_NAME)
    assert not loaded(set(mods), *NEVER, *PACKAGES.values())


def test_help_still_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tapnbd", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("serve", "info", "attach", "daemon", "export", "ring", "stats"):
        assert name in out


def test_every_command_is_in_the_lazy_table() -> None:
    """A command missing from COMMANDS still runs, but by importing every module: its
    start-up pays for the daemon, attach and the ring."""
    from tapnbd.cli import COMMANDS, app, load_commands

    load_commands()
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names == set(COMMANDS)


def test_start_up_leaves_the_collector_on_and_its_objects_frozen(images: dict[str, Path]) -> None:
    """The cyclic collector is off while the CLI imports (it would find nothing in what
    they build), and on again once the command runs, start-up's objects frozen out of
    its sight; importing the CLI (as the tests do) leaves it as it was."""
    code = (
        "import gc, json, sys\n"
        "from tapnbd.cli import main\n"
        "after_import = gc.isenabled()\n"
        "sys.argv = ['tapnbd', 'info', sys.argv[1]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps([after_import, gc.isenabled(), gc.get_freeze_count()]), file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(images["raw"])], capture_output=True, text=True
    )
    after_import, after_main, frozen = json.loads(proc.stderr.strip().splitlines()[-1])
    assert after_import and after_main and frozen > 10_000, proc.stderr
