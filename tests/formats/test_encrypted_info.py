"""Encrypted images: ``tapnbd info`` describes them as ``qemu-img info`` does without the
key (the LUKS header read as hostile input), and nothing else reads them: tapnbd holds
no keys, so a read would hand out ciphertext as the guest's data."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest

from formats import open_image
from formats.qcow2.luks import HEADER
from tapnbd.errors import EncryptedImageError, RequestError
from tests.formats.qcow_util import create_encrypted, need
from tests.formats.qcow_util import tapnbd_out as tapnbd
from tests.helpers import run, tapnbd_cmd

LUKS_OPTS = {
    "luks-default": "encrypt.format=luks,encrypt.iter-time=10",
    "luks-essiv": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,"
        "encrypt.hash-alg=sha1"
    ),
    "luks-twofish": "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=twofish-128",
    "aes": "encrypt.format=aes",
}


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("qemu-img")


def human(*cmd: str | Path) -> str:
    r = run([str(c) for c in cmd], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def as_json(*cmd: str | Path) -> object:
    return json.loads(human(*cmd))


@pytest.mark.parametrize("kind", sorted(LUKS_OPTS))
def test_info_describes_an_encrypted_qcow2_as_qemu_img_does(tmp_path: Path, kind: str) -> None:
    img = tmp_path / "enc.qcow2"
    create_encrypted(img, LUKS_OPTS[kind], "16M")
    # Byte for byte, the nested encrypt block and its key slots included.
    assert human(*tapnbd_cmd("info", str(img))) == human("qemu-img", "info", img)
    ours = as_json(*tapnbd_cmd("info", "--output=json", str(img)))
    assert ours == as_json("qemu-img", "info", "--output=json", img)


def test_an_encrypted_overlay_shows_its_backing_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    create_encrypted(top, f"encrypt.format=luks,encrypt.iter-time=10,backing_file={base},"
                     "backing_fmt=raw", "1M")  # fmt: skip
    args = ("info", "--backing-chain", "--output=json")
    ours = as_json(*tapnbd_cmd(*args, "-f", "qcow2", str(top)))
    theirs = as_json("qemu-img", *args, top)
    assert isinstance(ours, list) and isinstance(theirs, list)
    assert [e["filename"] for e in ours] == [e["filename"] for e in theirs]
    assert ours[0] == theirs[0]


def test_an_aes_qcow_v1_image_is_described(tmp_path: Path) -> None:
    img = tmp_path / "enc.qcow"
    create_encrypted(img, "encrypt.format=aes", "1M", fmt="qcow")
    theirs = human("qemu-img", "info", img)
    ours = human(*tapnbd_cmd("info", str(img)))
    assert "encrypted: yes" in theirs
    # tapnbd adds its own QCOW v1 section after qemu's lines.
    assert ours.startswith(theirs), ours


@pytest.mark.parametrize("kind", ["luks-default", "aes"])
def test_nothing_reads_an_encrypted_image(tmp_path: Path, kind: str) -> None:
    img = tmp_path / "enc.qcow2"
    create_encrypted(img, LUKS_OPTS[kind], "1M")
    for args in (["convert", "-O", "raw", str(img), str(tmp_path / "o.raw")],
                 ["compare", str(img), str(img)], ["map", str(img)]):  # fmt: skip
        out = tapnbd(*args, check=False)
        assert "the image is encrypted" in out and "holds no keys" in out, (args, out)
    with pytest.raises(EncryptedImageError):
        asyncio.run(open_image(str(img), read_only=True))

    async def read_described() -> None:
        driver = await open_image(str(img), read_only=True, encrypted=True)
        try:
            await driver.pread(0, 512)
        finally:
            await driver.close()

    with pytest.raises(RequestError, match="holds no keys"):
        asyncio.run(read_described())


def _luks_at(data: bytes | bytearray) -> int:
    at = data.find(b"LUKS\xba\xbe")
    assert at > 0
    return at


SLOT0 = HEADER.size


@pytest.mark.parametrize(
    ("field", "offset", "value", "says"),
    [
        ("magic", 0, b"LUKS\x00\x00", "magic"),
        ("version", 6, struct.pack(">H", 2), "version 2"),
        ("cipher name", 8, b"a" * 32, "cipher name is not NUL-terminated"),
        ("cipher name", 8, b"rot13\0", "cipher 'rot13'"),
        ("cipher mode", 40, b"xts-nothing\0", "cipher mode 'xts-nothing'"),
        ("hash spec", 72, b"crc32\0", "hash spec 'crc32'"),
        ("key bytes", 108, struct.pack(">I", 20), "key_bytes 20"),
        ("uuid", 168, b"\xff" * 40, "uuid"),
        ("slot active", SLOT0, struct.pack(">I", 7), "key slot 0: active 0x7"),
        ("slot stripes", SLOT0 + 44, struct.pack(">I", 1), "key slot 0: stripes 1"),
        ("slot offset", SLOT0 + 40, struct.pack(">I", 1 << 24), "key slot 0: key material"),
    ],
)
def test_a_hostile_luks_header_is_refused_by_name(
    tmp_path: Path, field: str, offset: int, value: bytes, says: str
) -> None:
    img = tmp_path / "enc.qcow2"
    create_encrypted(img, LUKS_OPTS["luks-default"], "1M")
    data = bytearray(img.read_bytes())
    at = _luks_at(data) + offset
    data[at : at + len(value)] = value
    img.write_bytes(data)
    out = tapnbd("info", img, check=False)
    assert "LUKS" in out and says in out, (field, out)
    assert "Traceback" not in out
