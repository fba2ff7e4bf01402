"""Disk formats: a registry, probing by score, and ``open_image``.

Probing is a contest of scores, as in QEMU's block layer: each format scores the first
bytes of an image, and the highest wins. raw scores 1 so that it wins only when nothing
else claims the image (QEMU raw_probe).

The registry is lazy: ``PROBES`` holds every format's probe (formats.probes, magic bytes
only), and ``BUILTIN`` names the module that defines each built-in ``Format``; that
module, with its driver, is imported when an image of its format is opened
(``get_format``). So ``tapnbd info x.qcow2`` imports the qcow2 driver and no other.

The image trust rules live here too (README, "Security model"): ``open_image`` takes
the admin's ``OpenRules`` and remembers, for the format's ``open`` running under it,
whether the format was probed. A format opens its file with ``RawDriver.open`` and the
flags ``open_rules()`` gives (lock, block devices), and its backing file with
``open_backing``, which refuses a name read from a probed header, and a name that is
not a local file (an NBD URI, ``rbd:``, ``ram:``) unless the admin allowed those.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace

from formats import probes
from tapnbd.driver import Driver
from tapnbd.errors import ImageError, MissingImageError

#: Bytes read from the start of an image for probing.
PROBE_SIZE = 512


@dataclass(frozen=True)
class Format:
    """One registered format."""

    name: str
    probe: Callable[[bytes], int]
    open: Callable[[str, bool], Awaitable[Driver]]
    #: Opens an image read-only at an internal snapshot (id or name), for formats that
    #: keep them (qcow2); None for the others.
    open_snapshot: Callable[[str, str], Awaitable[Driver]] | None = None
    #: Opens an encrypted image to describe it only (info): reads of it fail. None for
    #: formats without encryption.
    open_encrypted: Callable[[str], Awaitable[Driver]] | None = None


#: Built-in formats: name -> "module:attribute" of its Format, imported on first use.
BUILTIN: dict[str, str] = {
    "raw": "formats.raw:FORMAT",
    "qcow": "formats.qcow:FORMAT",
    "qcow2": "formats.qcow2:FORMAT",
    "vhd": "formats.vhd:FORMAT",
    "vpc": "formats.vhd:VPC",  # qemu's name for VHD: accepted by --format, never probed
}
#: Every known format's probe, by name: ``name in PROBES`` is "a format we know".
PROBES: dict[str, Callable[[bytes], int]] = {
    "raw": probes.probe_raw,
    "qcow": probes.probe_qcow,
    "qcow2": probes.probe_qcow2,
    "vhd": probes.probe_vhd,
    "vpc": probes.never,
}
#: The formats imported so far, or registered whole (the foreign ones), by name.
FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt
    PROBES[fmt.name] = fmt.probe


def get_format(name: str) -> Format:
    """The format called ``name`` (a key of PROBES), importing its module on first use."""
    fmt = FORMATS.get(name)
    if fmt is None:
        module, attr = BUILTIN[name].split(":")
        fmt = FORMATS[name] = getattr(importlib.import_module(module), attr)
    return fmt


#: Binary suffixes accepted by ``parse_size`` (qemu-img's K, M, G, T, P, E).
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_UNITS["E"] = 1 << 60
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>[KMGTPE]?)(?:I?B)?")


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """Parse ``1G``, ``512M``, ``1.5K``, ``4096`` (binary units, as qemu-img does).

    Only digits with an optional fraction and a K, M, G, T, P or E suffix: no signs,
    exponents, ``inf`` or ``nan``, and a fraction must come out as a whole number of
    bytes (``0.5K`` is 512, ``0.3K`` is refused). Exact arithmetic, so ``1e400`` cannot
    overflow a float on its way to a traceback.
    """
    m = _SIZE_RE.fullmatch(text.strip().upper()) if text else None
    if m is None:
        raise ImageError(
            f"invalid size {text!r}: expected a number of bytes with an optional "
            "K, M, G, T, P or E suffix (binary units)"
        )
    from fractions import Fraction  # here: decimal costs every CLI start ~3 ms

    value = Fraction(m["num"]) * _SIZE_UNITS[m["unit"]]
    if value.denominator != 1:
        raise ImageError(f"invalid size {text!r}: not a whole number of bytes")
    if value < 0 or (value == 0 and not allow_zero):
        raise ImageError(f"invalid size {text!r}: must be positive")
    return int(value)


@dataclass(frozen=True)
class OpenRules:
    """What the admin allowed for one ``open_image`` call and the chain under it.

    The trust rules (README, "Security model"): a header we probed may be guest data,
    so a backing name read from it is not followed unless the admin said so; backing
    files are regular files (block devices on request); writable opens lock the image.
    """

    #: Format of the top image's backing file. QCOW v1 cannot record it, so without
    #: this the backing file is probed, and then may not name a backing file itself.
    backing_format: str | None = None
    #: Follow backing names read from probed headers (the admin vouches for the chain).
    allow_probed_backing: bool = False
    #: Backing files may be block devices (a top image given by the admin always may).
    allow_block_devices: bool = False
    #: Follow backing names read from headers that are NBD URIs or ``rbd:`` names
    #: (without options): the admin trusts the headers to name servers and Ceph images.
    allow_remote_backing: bool = False
    #: The backing name the admin gave in this command for the image it has just written
    #: (create's -b, convert's -B): that image's header names it because the admin did,
    #: so the top image's backing name is followed when it is exactly this one.
    given_backing: str | None = None
    #: Opens stop nobody and are stopped by nobody (formats.locks; the admin shares the
    #: image on purpose: serve's --share, the tools' -U).
    share: bool = False
    #: Whether the file being opened now may be a block device (set per file).
    block_devices: bool = True
    #: Open no backing file at all: the image alone, to describe a damaged chain.
    no_backing: bool = False
    #: The image is opened as "raw" because it was probed as raw before (the daemon
    #: records the format it found, so that a restore or a device's data path does not
    #: probe the guest's bytes again): it keeps the probed-raw guard (formats.guard),
    #: as "--format raw" from the admin would not.
    guard_raw: bool = False


@dataclass(frozen=True)
class _Opening:
    """The image whose format's ``open`` is running: its rules, and how it was named."""

    path: str
    rules: OpenRules
    probed: bool
    depth: int  # 0 for the image the admin named, 1 for its backing file, ...


_opening: ContextVar[_Opening | None] = ContextVar("formats_opening", default=None)


def open_rules() -> OpenRules:
    """The rules for the file a format is opening now (defaults outside open_image)."""
    cur = _opening.get()
    return cur.rules if cur is not None else OpenRules()


def _read_probe_bytes(path: str, block_devices: bool) -> bytes:
    from formats.raw import open_file

    fd = open_file(path, read_only=True, block_devices=block_devices)
    try:
        return os.pread(fd, PROBE_SIZE, 0)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def probe_bytes(header: bytes) -> str | None:
    """The format that scores highest on ``header``, or None when none claims it."""
    name, score = max(((n, probe(header)) for n, probe in PROBES.items()), key=lambda x: x[1])
    return name if score > 0 else None


def probe(path: str, *, block_devices: bool = True) -> str:
    """The name of the format that scores highest on ``path``'s first bytes.

    The file is checked before it is read (formats.raw.open_file): a FIFO or a
    directory is refused, never waited on.
    """
    name = probe_bytes(_read_probe_bytes(path, block_devices))
    if name is None:
        raise ImageError(f"{path}: unknown image format")
    return name


#: URI schemes of an NBD export as an image name (formats.nbd opens them).
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


def is_nbd(spec: str) -> bool:
    return spec.split("://", 1)[0] in NBD_SCHEMES and "://" in spec


def is_local_path(spec: str) -> bool:
    """False for image names that are not files here (``ram:``, ``rbd:``, NBD URIs):
    those are kept as given, never made absolute or resolved."""
    return not (spec.startswith(("ram:", "rbd:")) or is_nbd(spec))


async def open_image(
    spec: str,
    *,
    fmt: str = "auto",
    read_only: bool = False,
    rules: OpenRules | None = None,
    snapshot: str | None = None,
    encrypted: bool = False,
) -> Driver:
    """Open ``spec`` (a path, or ``ram:SIZE``) as a driver stack.

    ``encrypted`` opens an encrypted image to be described (``info``): every read of it
    fails, since tapnbd holds no keys.

    ``snapshot`` (an id or a name) opens a qcow2 image as it was at that internal
    snapshot (qemu-nbd's ``--load-snapshot``), read-only whatever ``read_only`` says;
    other formats refuse it.

    ``driver.name`` is the format that was opened (probed or given), for callers that
    persist it so that a restart opens the same format instead of probing again.
    ``rules`` default to those of the image being opened around this call (a backing
    chain), else to ``OpenRules()``: the safe choices.
    """
    if snapshot is not None and not is_local_path(spec):
        hint = " (name an RBD snapshot as rbd:POOL/IMAGE@SNAP)" if spec.startswith("rbd:") else ""
        raise ImageError(
            f"{spec}: --snapshot {snapshot!r}: only qcow2 images have internal snapshots{hint}"
        )
    if spec.startswith("ram:"):
        from formats.ram import RamDriver

        return RamDriver(parse_size(spec[4:]))
    if is_nbd(spec):
        if fmt not in ("auto", "nbd", "raw"):
            raise ImageError(f"{spec}: an NBD export is served as it is, not as {fmt!r}")
        from formats.nbd import open_nbd

        return await open_nbd(spec, read_only)
    if spec.startswith("rbd:"):
        # "raw" too: QEMU's rbd is a protocol, so its overlays record the backing
        # format of an rbd: name as raw (qemu-img create -b rbd:... -F raw).
        if fmt not in ("auto", "rbd", "raw"):
            raise ImageError(f"{spec}: an rbd: name is served as it is, not as {fmt!r}")
        from formats.rbd.driver import open_rbd

        return await open_rbd(spec, read_only)
    if not os.path.lexists(spec):
        raise MissingImageError(f"{spec}: no such file or device")
    outer = _opening.get()
    if rules is None:
        rules = outer.rules if outer is not None else OpenRules()
    depth = outer.depth + 1 if outer is not None else 0
    # The admin named the top image, so it may be a block device; a backing name comes
    # from a header, so it may be one only when the admin allowed it.
    rules = replace(rules, block_devices=depth == 0 or rules.allow_block_devices)
    if fmt != "auto" and fmt not in PROBES:
        from formats.foreign import FOREIGN

        known = ", ".join(sorted(set(PROBES) - set(FOREIGN)))
        raise ImageError(f"unknown format {fmt!r}; known: {known}")
    probed = fmt == "auto"
    if probed:
        # Off the event loop: a slow disk must not stall a daemon serving other exports.
        import asyncio

        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(None, _read_probe_bytes, spec, rules.block_devices)
        name = probe_bytes(header)
        if name is None:
            raise ImageError(f"{spec}: unknown image format")
    else:
        name = fmt
    format_ = get_format(name)
    open_snapshot = format_.open_snapshot
    if snapshot is not None and open_snapshot is None:
        raise ImageError(
            f"{spec}: --snapshot {snapshot!r}: a {name} image has no internal snapshots "
            "(only qcow2 images have them)"
        )
    if encrypted and format_.open_encrypted is None:
        raise ImageError(f"{spec}: a {name} image is never encrypted")
    token = _opening.set(_Opening(spec, rules, probed, depth))
    try:
        if encrypted and format_.open_encrypted is not None:
            driver = await format_.open_encrypted(spec)
        elif snapshot is not None and open_snapshot is not None:
            driver = await open_snapshot(spec, snapshot)
        else:
            driver = await format_.open(spec, read_only)
    finally:
        _opening.reset(token)
    # A probed raw image stays raw: so does one probed earlier and recorded as raw.
    guarded = probed or (rules.guard_raw and depth == 0)
    if guarded and name == "raw" and not read_only:
        from formats.guard import ProbedRawGuard

        driver = ProbedRawGuard(driver, spec)
    return driver


class UnsafeBackingError(ImageError):
    """A backing name the trust rules do not let us follow."""


def _check_remote_backing(cur: _Opening, name: str, path: str) -> None:
    """Refuse the backing name ``name`` (resolved to ``path``, not a local file) of the
    image ``cur`` unless the admin allowed it (README, "Security model"): a header may
    come from anyone, and would reach servers, sockets and Ceph images as the host."""
    if cur.depth == 0 and cur.rules.given_backing is not None and name == cur.rules.given_backing:
        return  # the admin's own name, written into the header by this very command
    where = f"not opened: {cur.path} names {name!r} as its backing file"
    if path.startswith("ram:"):
        # Nothing to trust: it would only allocate memory the header asked for.
        raise UnsafeBackingError(f"{where}; a ram: name from a header is never followed")
    if not cur.rules.allow_remote_backing:
        kind = "an rbd: name" if path.startswith("rbd:") else "an NBD URI"
        raise UnsafeBackingError(
            f"{where}, {kind}, not a local file: a header may come from anyone, so it is "
            "not followed to a server or a Ceph image (--allow-remote-backing if you "
            "trust the image's header to name them)"
        )
    if path.startswith("rbd:"):
        from formats.rbd.spec import parse

        spec = parse(path)
        given = [
            *(["conf="] if spec.conf is not None else []),
            *(["id="] if spec.user is not None else []),
            *(f"{key}=" for key in spec.options),
        ]
        if given:
            # They would go to librados: conf= reads a host file as a ceph.conf, and a
            # key such as log_file= makes it write one.
            raise UnsafeBackingError(
                f"{where}, an rbd: name with options ({', '.join(given)}): options are "
                "never taken from a header, even with --allow-remote-backing (librados "
                "takes them from the admin's ceph.conf, CEPH_CONF or CEPH_ARGS)"
            )


async def open_backing(name: str, path: str, fmt: str | None = None) -> Driver | None:
    """Open the backing file ``name`` (resolved to ``path``) of the image being opened.

    ``fmt`` is the backing format recorded in the image, for formats that record one
    (QCOW v1 does not). A name read from a probed header is followed only when the
    admin allowed it: a guest that wrote a header into its raw disk must not make us
    open a host path (the CVE-2008-2004 class). A name that is not a local file is
    followed only as ``_check_remote_backing`` allows, whatever the format.
    """
    # A format's open called directly, not through open_image: its caller chose the
    # format, so the image counts as given, with the default rules.
    cur = _opening.get() or _Opening(path, OpenRules(), probed=False, depth=0)
    if cur.rules.no_backing:
        return None  # the caller's driver reads the image alone, as qemu's NO_BACKING
    if cur.probed and not cur.rules.allow_probed_backing:
        raise UnsafeBackingError(
            f"not opened: the format of {cur.path} was probed, not given, and a probed "
            "header may be guest data, so the backing file it names is not followed "
            "(give the image's format: --format for the image, --backing-format for its "
            "backing file; or --allow-probed-backing-chain if you trust the whole chain)"
        )
    if not is_local_path(path):
        _check_remote_backing(cur, name, path)
    if fmt is None and cur.depth == 0 and cur.rules.backing_format is not None:
        fmt = cur.rules.backing_format
    token = _opening.set(cur)  # the same, unless made up above: depth 1 below it
    try:
        return await open_image(path, fmt=fmt or "auto", read_only=True)
    finally:
        _opening.reset(token)


def _register_foreign() -> None:
    from formats.foreign import register_all  # light: magics and a refusal, no driver

    register_all()


_register_foreign()
