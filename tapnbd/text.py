"""Names from hostile sources, made safe to print (and, through tapnbd.logformat, to log).

Messages quote names from image headers (backing files), from the file system (a shared
directory's file names) and from peers. Such a name must not move the cursor, recolour or
retitle a terminal (ESC, CSI, OSC), reorder what is shown (bidirectional overrides), or,
in a log, start a line of its own that reads like another record. Here those characters
are shown as escapes, so the text stays what it was and can be read back.
"""

from __future__ import annotations

#: C0 and C1 controls and DEL as ``\\xNN``; bidirectional embeddings, overrides and
#: isolates (the "Trojan Source" characters) and the line and paragraph separators as
#: ``\\uNNNN``. Tab and newline are decided by the caller.
_ESCAPES: dict[int, str] = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)},
}
_TAB, _NEWLINE = 0x09, 0x0A
_LINES = {c: e for c, e in _ESCAPES.items() if c not in (_TAB, _NEWLINE)}
_ONE_LINE = {c: e for c, e in _ESCAPES.items() if c != _TAB}


def printable(text: str) -> str:
    """``text`` for a terminal: every control character but tab and newline escaped."""
    return text.translate(_LINES)


def one_line(text: str) -> str:
    """``text`` as one line: newlines escaped too."""
    return text.translate(_ONE_LINE)
