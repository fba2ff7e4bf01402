"""Image names in qemu's spelling: ``rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]``.

``conf`` names a ceph.conf (without it librados reads ``$CEPH_CONF`` or its default
search path), ``id`` the client name (``admin`` when absent). Any other ``key=value``
is set on the cluster handle before connecting, as qemu does (for example
``:rados_osd_op_timeout=5``). A colon inside a value is written ``\\:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tapnbd.errors import ImageError

PREFIX = "rbd:"

#: Seconds before an OSD or monitor request fails with ETIMEDOUT instead of waiting for a
#: dead OSD forever (librados' default is 0: no timeout). Overridable per image.
DEFAULT_OP_TIMEOUT = 30

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class RbdSpec:
    pool: str
    image: str
    snap: str | None = None
    conf: str | None = None
    user: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        snap = f"@{self.snap}" if self.snap else ""
        return f"{PREFIX}{self.pool}/{self.image}{snap}"

    def rados_options(self) -> dict[str, str]:
        """Options for rados_conf_set, with the op timeouts defaulted."""
        opts = {
            # NBD makes writes durable only at FLUSH or FUA (the spec's contract), and
            # clients that need durability send them: librbd's writeback cache may start
            # at once instead of waiting for a first flush, as it does for old guests.
            "rbd_cache_writethrough_until_flush": "false",
            "rados_osd_op_timeout": str(DEFAULT_OP_TIMEOUT),
            "rados_mon_op_timeout": str(DEFAULT_OP_TIMEOUT),
            "client_mount_timeout": str(DEFAULT_OP_TIMEOUT),
        }
        opts.update(self.options)
        return opts


def is_rbd(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _split_unescaped(text: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse(spec: str) -> RbdSpec:
    """Parse an ``rbd:`` name; errors name the part that is wrong."""
    if not is_rbd(spec):
        raise ImageError(f"{spec}: not an rbd: name")
    head, *rest = _split_unescaped(spec[len(PREFIX) :])
    pool, sep, image = head.partition("/")
    if not sep or not pool or not image:
        raise ImageError(f"{spec}: expected rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]")
    image, _, snap = image.partition("@")
    for what, value in (("pool", pool), ("image", image)) + ((("snapshot", snap),) if snap else ()):
        if not _NAME.match(value):
            raise ImageError(f"{spec}: invalid {what} name {value!r}")
    conf = user = None
    options: dict[str, str] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ImageError(f"{spec}: option {item!r} is not KEY=VALUE")
        if key == "conf":
            conf = value
        elif key == "id":
            user = value
        else:
            options[key] = value
    return RbdSpec(pool, image, snap or None, conf, user, options)
