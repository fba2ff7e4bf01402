"""The command reference, docs/commands.md, generated from the CLI itself.

``python -m tapnbd.cli.docs [--output FILE]`` (``make docs``) walks the click commands
typer builds from every command module and writes each command's help, usage,
arguments and options as Markdown. A test checks the committed file is up to date, so
the reference cannot drift from ``--help``.
"""

from __future__ import annotations

import sys
from typing import Any

HEADER = """\
# tapnbd command reference

Generated from the CLI by `make docs` (`python -m tapnbd.cli.docs`); do not edit.
`tapnbd COMMAND --help` prints the same.
"""


def _plain(text: str) -> str:
    """Help text without rich markup or click's no-rewrap marks."""
    from rich.text import Text

    lines = [ln for ln in text.splitlines() if ln.strip() != "\b"]
    return Text.from_markup("\n".join(lines).strip()).plain


def _section(cmd: Any, ctx: Any, path: str, out: list[str]) -> None:
    import typer

    level = "#" * min(6, path.count(" ") + 1)
    out.append(f"{level} `{path}`\n")
    if cmd.help:
        out.append(_plain(cmd.help) + "\n")
    pieces = cmd.collect_usage_pieces(ctx)
    out.append(f"```\n{path} {' '.join(pieces)}\n```\n")
    args: list[str] = []
    opts: list[str] = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        name, help_text = record
        line = f"* `{name}`" + (f": {_plain(help_text)}" if help_text else "")
        (args if param.param_type_name == "argument" else opts).append(line)
    if args:
        out.append("Arguments:\n\n" + "\n".join(args) + "\n")
    if opts:
        out.append("Options:\n\n" + "\n".join(opts) + "\n")
    if hasattr(cmd, "list_commands"):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            _section(sub, typer.Context(sub, info_name=name, parent=ctx), f"{path} {name}", out)


def reference() -> str:
    """The Markdown reference of every command."""
    import typer

    from tapnbd.cli import app, load_commands

    load_commands()
    root = typer.main.get_command(app)
    out = [HEADER]
    _section(root, typer.Context(root, info_name="tapnbd"), "tapnbd", out)
    lines = "\n".join(out).rstrip("\n").splitlines()
    return "\n".join(line.rstrip() for line in lines) + "\n"


def main(argv: list[str]) -> int:
    text = reference()
    if len(argv) == 2 and argv[0] in ("-o", "--output"):
        with open(argv[1], "w") as f:
            f.write(text)
    elif argv:
        print("usage: python -m tapnbd.cli.docs [--output FILE]", file=sys.stderr)
        return 2
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
