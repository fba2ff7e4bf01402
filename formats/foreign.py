"""Formats tapnbd recognises but has no driver for: VMDK, VHDX, VDI and QED.

Each one is registered with a probe that scores its magic and an ``open`` that refuses
with the converter to use. Without them a ``.vmdk`` probed as raw and was served as a
small raw disk of its metadata. Registered formats also arm the probed-raw guard
(formats/guard.py): a guest cannot write one of these magics into sector 0 of a probed
raw disk, so the next probe cannot mistake the disk for, say, a VMDK whose descriptor
names host files as its extents. An admin who says ``--format raw`` gets raw.

The magics, as QEMU's probes read them (block/vmdk.c, vhdx.c, vdi.c, qed.c):

- VMDK: ``KDMV`` (sparse extent, VMDK4_MAGIC read little-endian), ``COWD`` (the older
  VMDK3 sparse extent), or a text descriptor starting ``# Disk DescriptorFile``;
- VHDX: ``vhdxfile`` at 0 (the file type identifier);
- VDI: the signature 0xbeda107f, little-endian, at 0x40 (after a ``<<< ... >>>`` text);
- QED: ``QED\\0`` at 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tapnbd.driver import Driver
from tapnbd.errors import ImageError

VDI_SIGNATURE = (0xBEDA107F).to_bytes(4, "little")
VDI_SIGNATURE_OFFSET = 0x40


def probe_vmdk(head: bytes) -> int:
    if head[:4] in (b"KDMV", b"COWD"):
        return 100
    # A descriptor file: text, its first line a comment naming it.
    if head.lstrip(b"\xef\xbb\xbf").startswith(b"# Disk DescriptorFile"):
        return 100
    return 0


def probe_vhdx(head: bytes) -> int:
    return 100 if head[:8] == b"vhdxfile" else 0


def probe_vdi(head: bytes) -> int:
    sig = head[VDI_SIGNATURE_OFFSET : VDI_SIGNATURE_OFFSET + 4]
    return 100 if sig == VDI_SIGNATURE else 0


def probe_qed(head: bytes) -> int:
    return 100 if head[:4] == b"QED\0" else 0


#: name -> (probe, what it is).
FOREIGN: dict[str, tuple[Callable[[bytes], int], str]] = {
    "vmdk": (probe_vmdk, "VMware VMDK"),
    "vhdx": (probe_vhdx, "Hyper-V VHDX"),
    "vdi": (probe_vdi, "VirtualBox VDI"),
    "qed": (probe_qed, "QEMU QED"),
}


def refusal(path: str, name: str) -> str:
    """The message for a foreign image: what it is, and how to get a format we serve."""
    what = FOREIGN[name][1]
    return (
        f"{path}: a {what} image ({name}), which tapnbd cannot read; convert it first: "
        f"qemu-img convert -f {name} -O qcow2 {path} {path}.qcow2 "
        f"(or give --format raw to use the file's bytes as a raw disk)"
    )


def _opener(name: str) -> Callable[[str, bool], Awaitable[Driver]]:
    async def open_foreign(path: str, read_only: bool) -> Driver:
        raise ImageError(refusal(path, name))

    return open_foreign


def register_all() -> None:
    from formats import Format, register

    for name, (probe, _what) in FOREIGN.items():
        register(Format(name, probe, _opener(name)))
