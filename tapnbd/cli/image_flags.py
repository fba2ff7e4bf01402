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
