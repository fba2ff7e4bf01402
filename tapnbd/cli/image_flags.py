"""Options that do not apply to the format asked for are refused, never ignored.

qemu-img refuses an option the format's driver does not know ("Invalid parameter");
``tapnbd create`` does the same, naming the option, so that ``-b base --optimise`` does
not silently give a normal image.
"""

from __future__ import annotations

from tapnbd.cli.app import fail

#: The formats each format-specific ``create`` option applies to.
_APPLIES: dict[str, tuple[str, ...]] = {
    "--preallocation": ("qcow2",),
    "--optimise/--no-optimise": ("qcow",),
    "--cluster-size": ("qcow", "qcow2", "vhd", "vpc"),
    "--subformat": ("vhd", "vpc"),
    "--reserve": ("qcow", "raw"),
    "--backing": ("qcow", "qcow2", "vhd", "vpc"),
}

#: What to use instead, where there is something.
_INSTEAD: dict[str, str] = {
    "--preallocation": " (--reserve reserves the space of a raw or qcow image)",
    "--reserve": " (qcow2: --preallocation falloc)",
}


def refuse_create_flags(
    fmt: str,
    *,
    backing: str | None,
    backing_format: str | None,
    preallocation: str | None,
    optimise: bool | None,
    cluster_size: str | None,
    subformat: str | None,
    reserve: bool,
) -> None:
    """Exit 1 naming the first option given that ``fmt`` would not use."""
    given = {
        "--preallocation": preallocation is not None,
        "--optimise/--no-optimise": optimise is not None,
        "--cluster-size": cluster_size is not None,
        "--subformat": subformat is not None,
        "--reserve": reserve,
        "--backing": backing is not None,
    }
    known = fmt in {f for fmts in _APPLIES.values() for f in fmts}
    for flag, on in given.items():
        if on and known and fmt not in _APPLIES[flag]:
            name = flag.split("/")[optimise is False] if "/" in flag else flag
            fail(f"{name} does not apply to a {fmt} image{_INSTEAD.get(flag, '')}")
    if backing_format is not None and backing is None:
        fail("--backing-format needs a backing file (-b)")
    # blktap's allocation-optimised images preallocate whole extents, whose zeros would
    # hide the backing file (spec §2.4): the flag cannot apply to an overlay.
    if optimise and backing is not None:
        fail(
            "--optimise does not apply with a backing file: an overlay is never "
            "allocation-optimised (its preallocated zeros would hide the backing data)"
        )


def parse_options(text: str | None) -> dict[str, str]:
    """``-o key=value,key=value`` (qemu-img's creation options); ``-`` in a key is ``_``."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"-o {item!r}: expected key=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


#: ``create -o``'s keys per format, and the flag each one also has (None: -o only).
_CREATE_KEYS: dict[str, dict[str, str | None]] = {
    "qcow2": {
        "size": "--size",
        "backing_file": "--backing",
        "backing_fmt": "--backing-format",
        "cluster_size": "--cluster-size",
        "preallocation": "--preallocation",
        "compat": None,
        "refcount_bits": None,
        "lazy_refcounts": None,
    },
    "qcow": {
        "size": "--size",
        "backing_file": "--backing",
        "backing_fmt": "--backing-format",
        "cluster_size": "--cluster-size",
    },
    "vhd": {
        "size": "--size",
        "backing_file": "--backing",
        "subformat": "--subformat",
        "block_size": "--cluster-size",
    },
    "raw": {"size": "--size"},
}
_CREATE_KEYS["vpc"] = _CREATE_KEYS["vhd"]
#: ``convert -o``'s keys: the destination's layout (its size and backing come from the
#: source).
_LAYOUT_KEYS = {"cluster_size", "block_size", "compat", "refcount_bits", "lazy_refcounts"}
_CONVERT_KEYS: dict[str, dict[str, str | None]] = {
    fmt: {k: v for k, v in keys.items() if k in _LAYOUT_KEYS} for fmt, keys in _CREATE_KEYS.items()
}


def create_options(
    fmt: str, text: str | None, flags: dict[str, str | None], *, command: str = "create"
) -> tuple[dict[str, str | None], dict[str, str]]:
    """Fold ``-o`` into the flags' values (``flags``: flag name to value); the keys that
    have no flag come back on their own (``Qcow2Options.from_keys`` reads them).

    A key the format does not take, or one given both ways, is refused by name, as
    qemu-img refuses an "Invalid parameter".
    """
    opts = parse_options(text)
    keys = (_CREATE_KEYS if command == "create" else _CONVERT_KEYS).get(fmt, {})
    merged, rest = dict(flags), dict[str, str]()
    for key, value in opts.items():
        if key not in keys:
            takes = ", ".join(keys) or "no -o option"
            fail(f"-o {key} does not apply to a {fmt} image (it takes {takes})")
        flag = keys[key]
        if flag is None:
            rest[key] = value
        elif merged.get(flag) is not None:
            fail(f"-o {key} and {flag} are both given")
        else:
            merged[flag] = value
    return merged, rest
