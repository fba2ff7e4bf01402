"""``--tls require`` at the protocol level (sans-I/O): before STARTTLS, every option but
STARTTLS and ABORT is refused with ERR_TLS_REQD and changes nothing; after it, the same
options work (NBD spec, "Option haggling" and FORCEDTLS)."""

from __future__ import annotations

import struct

import pytest

from tapnbd.errors import ProtocolError
from tapnbd.protocol.consts import Opt, Rep
from tapnbd.protocol.handshake import Abort, Ready, StartTLS, TLSMode
from tests.protocol.test_handshake import feed, go_data, meta_data, new, opt, replies

NO_ZEROES = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES

#: Every option a client may send before TLS, with a valid payload.
OPTIONS = {
    "LIST": opt(Opt.LIST),
    "INFO": opt(Opt.INFO, go_data("disk")),
    "GO": opt(Opt.GO, go_data("disk")),
    "STRUCTURED_REPLY": opt(Opt.STRUCTURED_REPLY),
    "LIST_META_CONTEXT": opt(Opt.LIST_META_CONTEXT, meta_data("disk", "base:allocation")),
    "SET_META_CONTEXT": opt(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation")),
    "PEEK_EXPORT": opt(Opt.PEEK_EXPORT),
    "unknown": opt(77),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_before_starttls_is_refused(name: str) -> None:
    hs = new(TLSMode.REQUIRE)
    events, out = feed(hs, NO_ZEROES + OPTIONS[name])
    _, rep, message = replies(out)[0]
    assert rep == Rep.ERR_TLS_REQD and message, (name, rep)
    assert not events  # still haggling: no Ready, no Abort
    # Nothing it asked for was granted.
    assert not hs.structured and not hs.meta_contexts


def test_starttls_then_the_same_options_work() -> None:
    hs = new(TLSMode.REQUIRE)
    refused = OPTIONS["STRUCTURED_REPLY"] + OPTIONS["SET_META_CONTEXT"] + OPTIONS["LIST"]
    events, out = feed(hs, NO_ZEROES + refused + opt(Opt.STARTTLS))
    assert [r[1] for r in replies(out)] == [Rep.ERR_TLS_REQD] * 3 + [Rep.ACK]
    assert isinstance(events[-1], StartTLS)
    hs.tls_started()
    _, out = feed(hs, OPTIONS["STRUCTURED_REPLY"] + OPTIONS["LIST"])
    assert [r[1] for r in replies(out)] == [Rep.ACK, Rep.SERVER, Rep.ACK]
    events, _ = feed(hs, OPTIONS["GO"])
    assert isinstance(events[-1], Ready) and events[-1].structured


def test_abort_is_allowed_before_starttls() -> None:
    hs = new(TLSMode.REQUIRE)
    events, out = feed(hs, NO_ZEROES + opt(Opt.ABORT))
    assert [r[1] for r in replies(out)] == [Rep.ACK]
    assert isinstance(events[-1], Abort)


def test_export_name_before_starttls_ends_the_session() -> None:
    # EXPORT_NAME has no error reply: "the server MUST terminate the session".
    with pytest.raises(ProtocolError):
        feed(new(TLSMode.REQUIRE), NO_ZEROES + opt(Opt.EXPORT_NAME, b"disk"))


def test_tls_on_does_not_require_it() -> None:
    events, _ = feed(new(TLSMode.ON), NO_ZEROES + OPTIONS["GO"])
    assert isinstance(events[-1], Ready)
