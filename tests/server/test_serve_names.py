"""``serve NAME=IMAGE ...``: each image named on the command line, seen by nbdinfo."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tapnbd.server.standalone import split_named
from tests.helpers import Server, need, run, tapnbd_cmd


def listed(uri: str) -> list[tuple[str, int]]:
    need("nbdinfo")
    info = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)
    return sorted((e["export-name"], e["export-size"]) for e in info["exports"])


def test_ram_disks_named(serve: Callable[..., Server]) -> None:
    server = serve("a=ram:1M", "b=ram:2M", exports=2)
    assert [u.rsplit("/", 1)[1] for u in server.uris] == ["a", "b"]
    assert listed(server.uri) == [("a", 1 << 20), ("b", 2 << 20)]


def test_same_base_name_works_with_names(serve: Callable[..., Server], tmp_path: Path) -> None:
    for d, size in (("x", 1), ("y", 3)):
        (tmp_path / d).mkdir()
        with open(tmp_path / d / "disk.img", "wb") as f:
            f.truncate(size << 20)
    x, y = tmp_path / "x" / "disk.img", tmp_path / "y" / "disk.img"
    # Without names the two would clash: refused, with the way out in the message.
    err = run(tapnbd_cmd("serve", str(x), str(y), "--port", "0"), check=False).stderr
    assert "'disk.img'" in err and "NAME=IMAGE" in err
    server = serve(f"one={x}", f"two={y}", exports=2)
    assert listed(server.uri) == [("one", 1 << 20), ("two", 3 << 20)]


def test_named_and_name_option_conflict(tmp_path: Path) -> None:
    proc = run(tapnbd_cmd("serve", "a=ram:1M", "--name", "b", "--port", "0"), check=False)
    assert proc.returncode != 0 and "named twice" in proc.stderr


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("a=ram:1G", ("a", "ram:1G")),
        ("vm-disk=/srv/d.img", ("vm-disk", "/srv/d.img")),
        ("/srv/a=b.img", (None, "/srv/a=b.img")),  # a path holding "="
        ("nbd://h/e?tls-certificates=/d", (None, "nbd://h/e?tls-certificates=/d")),
        ("rbd:pool/img=x", (None, "rbd:pool/img=x")),
        ("=disk.img", (None, "=disk.img")),
        ("a=", (None, "a=")),
    ],
)
def test_split_named(arg: str, expected: tuple[str | None, str]) -> None:
    assert split_named(arg) == expected


def test_an_existing_file_with_equals_is_an_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a=b.img").write_bytes(b"")
    assert split_named("a=b.img") == (None, "a=b.img")
