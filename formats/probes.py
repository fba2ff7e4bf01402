"""What each built-in format's first bytes look like: the probes, and nothing else.

Probing runs every format's probe on an image's first bytes and imports only the
winner's driver (formats.BUILTIN), so this module imports no driver and no
asyncio: ``tapnbd info x.qcow2`` pays for the qcow2 driver alone. The magics are
defined here once; each format's layout module takes them from here.
"""

from __future__ import annotations

#: ('Q'<<24)|('F'<<16)|('I'<<8)|0xFB: bytes "QFI\xfb", shared by QCOW v1 and qcow2.
QCOW_MAGIC = 0x514649FB
QCOW_VERSION = 1
#: The VHD footer's cookie; a dynamic or differencing disk starts with the footer's copy.
FOOTER_COOKIE = b"conectix"


def probe_raw(header: bytes) -> int:
    """Anything is a raw image; score lowest so every real format wins (QEMU raw_probe)."""
    return 1


def probe_qcow(header: bytes) -> int:
    """100 on the QCOW magic and version 1 (QEMU qcow_probe).

    Versions 2 and 3 (qcow2) are claimed too, with a lower score, so that opening one
    fails with a hint instead of serving the qcow2 file as a raw disk.
    """
    if len(header) < 8 or int.from_bytes(header[:4], "big") != QCOW_MAGIC:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") == QCOW_VERSION else 50


def probe_qcow2(header: bytes) -> int:
    """100 on the magic ``QFI\\xfb`` and version 2 or 3 (QEMU qcow2_probe)."""
    if len(header) < 8 or int.from_bytes(header[:4], "big") != QCOW_MAGIC:
        return 0
    return 100 if int.from_bytes(header[4:8], "big") in (2, 3) else 0


def probe_vhd(header: bytes) -> int:
    """100 on the footer copy's cookie ``conectix`` at offset 0 (QEMU vpc_probe)."""
    return 100 if header[:8] == FOOTER_COOKIE else 0


def never(header: bytes) -> int:
    """For a name that --format accepts but probing never answers (``vpc``)."""
    return 0
