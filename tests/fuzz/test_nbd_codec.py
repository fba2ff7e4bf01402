"""The NBD codec under fuzzing: a short budget of the `make fuzz` harness, hypothesis
stateful tests of the handshake, random splits for the decoder, and the regressions."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tapnbd.errors import ProtocolError
from tapnbd.protocol import transmission as tx
from tapnbd.protocol.consts import IHAVEOPT, REQUEST_MAGIC, Cmd, Opt
from tapnbd.protocol.handshake import (
    MAX_OPTION_DATA,
    NEED_DATA,
    Abort,
    Handshake,
    Ready,
    StartTLS,
    TLSMode,
)
from tests.fuzz import nbd_codec as nc
from tests.fuzz.__main__ import run_random
from tests.fuzz.regressions.nbd_codec import CASES

#: Inputs for the short budget (make fuzz runs 10^6 with atheris).
BUDGET_INPUTS = 4000


def test_short_fuzz_budget_with_bounded_memory() -> None:
    t0 = time.monotonic()
    assert run_random(nc.one_input, nc.seeds(), BUDGET_INPUTS, seed=1) == BUDGET_INPUTS
    # Memory: replay a slice under tracemalloc; the biggest input builds a 1 MiB stream,
    # and nothing the codec holds may grow past a few times that.
    tracemalloc.start()
    try:
        run_random(nc.one_input, nc.seeds(), 300, seed=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes"
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("hexdata", [h for _, h in CASES.values()], ids=list(CASES))
def test_regression_inputs(hexdata: str) -> None:
    nc.one_input(bytes.fromhex(hexdata))


# The bugs the fuzzer found, as plain unit tests of the codec's API.


def test_export_name_while_shutting_down_hangs_up() -> None:
    hs = Handshake(nc.FuzzCatalog(), shutting_down=lambda: True)
    hs.receive_data(struct.pack(">I", 3) + opt(Opt.EXPORT_NAME, b"disk"))
    with pytest.raises(ProtocolError):
        hs.next_event()
    assert hs.data_to_send() == b""  # no option reply: EXPORT_NAME has none


def test_error_messages_are_strings_of_at_most_4096_bytes() -> None:
    hs = Handshake(nc.FuzzCatalog())
    name = "\u00e9" * 2048  # 4096 bytes; quoted in the message, longer than that
    data = struct.pack(">I", 4096) + name.encode() + b"\0\0"
    hs.receive_data(struct.pack(">I", 3) + opt(Opt.INFO, data))
    assert hs.next_event() is NEED_DATA
    out = hs.data_to_send()
    (length,) = struct.unpack_from(">I", out, 16)
    assert length <= 4096
    out[20:].decode()
    # The same for the error chunk of a structured reply: no character cut in half.
    chunk = tx.error_chunk(1, 5, "\ufffd" * 2000)  # 3 bytes each
    assert len(chunk) - 26 <= 4096
    chunk[26:].decode()


def test_feed_after_a_complete_in_place_payload() -> None:
    dec = tx.RequestDecoder()
    n = tx._DIRECT_MIN
    head = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, n)
    dec.feed(head + bytes(10))
    assert dec.next_request() is None  # the payload is now received in place
    flush = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.FLUSH, 2, 0, 0)
    dec.feed(bytes(n - 10) + flush)  # hung before the fix
    assert dec.next_request() == tx.Request(0, Cmd.WRITE, 1, 0, n, memoryview(bytes(n)))
    assert dec.next_request() == tx.Request(0, Cmd.FLUSH, 2, 0, 0)


def test_drain_frees_what_it_consumed() -> None:
    dec = tx.RequestDecoder(max_payload=1024, max_drain=1 << 20)
    head = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 1 << 20)
    dec.feed(head + bytes(200_000))
    assert dec.next_request() is None
    assert len(dec._buf) == 0


# The handshake as a state machine: hypothesis picks options, valid and not.


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def _name() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(nc.NAMES), st.binary(max_size=12))


def _info_go() -> st.SearchStrategy[bytes]:
    good = st.builds(
        lambda n, infos: struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + infos,
        _name(),
        st.lists(st.integers(0, 5), max_size=4).map(
            lambda xs: b"".join(struct.pack(">H", x) for x in xs)
        ),
    )
    return st.one_of(good, st.binary(max_size=20))


def _meta() -> st.SearchStrategy[bytes]:
    def build(n: bytes, queries: list[bytes]) -> bytes:
        body = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)

    good = st.builds(build, _name(), st.lists(st.sampled_from(nc.QUERIES), max_size=3))
    return st.one_of(good, st.binary(max_size=20))


OPTION = st.one_of(
    st.tuples(st.sampled_from([Opt.INFO, Opt.GO]), _info_go()),
    st.tuples(st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]), _meta()),
    st.tuples(st.just(Opt.EXPORT_NAME), _name()),
    st.tuples(
        st.sampled_from([Opt.LIST, Opt.STRUCTURED_REPLY, Opt.STARTTLS, Opt.ABORT]),
        st.one_of(st.just(b""), st.binary(max_size=4)),
    ),
    st.tuples(st.sampled_from(nc.OPT_CODES), st.binary(max_size=16)),
)


TLS_MODES = st.sampled_from(list(TLSMode))
CLIENT_FLAGS = st.one_of(st.sampled_from([1, 3]), st.integers(0, 2**32 - 1))


class HandshakeMachine(RuleBasedStateMachine):
    """Each rule is one client message; every answer is checked by nbd_codec's reader."""

    def __init__(self) -> None:
        super().__init__()
        self.hs = Handshake(nc.FuzzCatalog())
        self.neg = nc.Negotiated()
        self.tls = TLSMode.OFF
        self.over = False  # the session ended (transmission, abort or dropped)
        self.no_zeroes = True

    @initialize(tls=TLS_MODES, flags=CLIENT_FLAGS)
    def start(self, tls: TLSMode, flags: int) -> None:
        self.connect(tls, flags)

    @precondition(lambda self: self.over)
    @rule(tls=TLS_MODES, flags=CLIENT_FLAGS)
    def reconnect(self, tls: TLSMode, flags: int) -> None:
        self.connect(tls, flags)

    def connect(self, tls: TLSMode, flags: int) -> None:
        self.tls, self.over = tls, False
        self.neg = nc.Negotiated()
        self.hs = Handshake(nc.FuzzCatalog(), tls=tls)
        self.no_zeroes = bool(flags & 2)
        self.hs.receive_data(struct.pack(">I", flags))
        try:
            assert self.hs.next_event() is NEED_DATA
        except ProtocolError:
            assert flags & ~3, "known client flags refused"
            self.over = True

    @precondition(lambda self: not self.over)
    @rule(option=OPTION, cut=st.integers(0, 40))
    def send_option(self, option: tuple[int, bytes], cut: int) -> None:
        code, data = option
        raw = opt(code, data)
        # Sometimes in two pieces: nothing may happen until the option is complete.
        if 0 < cut < len(raw):
            self.hs.receive_data(raw[:cut])
            assert self.hs.next_event() is NEED_DATA
            assert self.hs.data_to_send() == b""
            raw = raw[cut:]
        self.hs.receive_data(raw)
        try:
            ev = self.hs.next_event()
        except ProtocolError:
            # Only an option the spec lets the server hang up on.
            assert code in (Opt.EXPORT_NAME, Opt.STARTTLS), f"dropped on option {code}"
            self.over = True
            return
        out = nc.Replies(self.hs.data_to_send())
        client = nc.ClientOption(code, data, 0)
        due = nc.check_option_answer(client, out, self.neg, self.tls, False, self.no_zeroes)
        assert out.left() == 0
        assert (ev is NEED_DATA and due is None) or ev == due, (ev, due)
        if isinstance(ev, StartTLS):
            self.hs.tls_started()
            self.neg = nc.Negotiated(tls_active=True)
        if isinstance(ev, Ready | Abort):
            self.over = True

    @precondition(lambda self: not self.over)
    @rule(garbage=st.binary(min_size=16, max_size=40))
    def send_garbage(self, garbage: bytes) -> None:
        self.hs.receive_data(garbage)
        magic, _, length = struct.unpack_from(">QII", garbage)
        try:
            ev = self.hs.next_event()
        except ProtocolError:
            assert magic != IHAVEOPT or length > MAX_OPTION_DATA
            self.over = True
            return
        # An option after all (or one waiting for its data): the machine goes on no more.
        assert magic == IHAVEOPT, ev
        self.over = True

    @invariant()
    def holds_at_most_one_option(self) -> None:
        assert len(self.hs._buf) < 16 + MAX_OPTION_DATA


HandshakeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=20, deadline=None
)
TestHandshakeMachine = HandshakeMachine.TestCase


# The decoder: valid requests and garbage, cut anywhere.

REQUEST = st.builds(
    lambda cmd, flags, cookie, offset, length, payload_len: (
        struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        + (bytes(range(256)) * 8)[: min(length, payload_len)]
        if cmd == Cmd.WRITE
        else struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
    ),
    st.sampled_from([*Cmd, 42]),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, 2048), st.integers(0, 2**32 - 1)),
    st.integers(0, 2048),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(REQUEST, max_size=12),
    garbage=st.binary(max_size=64),
    cuts=st.lists(st.integers(1, 3000), max_size=10),
    buffered=st.booleans(),
)
def test_decoder_random_splits(
    requests: list[bytes], garbage: bytes, cuts: list[int], buffered: bool
) -> None:
    stream = b"".join(requests) + garbage
    expected, must_fail = nc.reference_decode(stream, 1024, 2048)
    dec = tx.RequestDecoder(max_payload=1024, max_drain=2048)
    got, failed, pos = [], False, 0
    points = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    try:
        for end in points:
            piece = stream[pos:end]
            pos = end
            if buffered:
                while piece:
                    buf = dec.get_buffer(len(piece))
                    n = min(len(buf), len(piece))
                    buf[:n] = piece[:n]
                    dec.buffer_updated(n)
                    piece = piece[n:]
            else:
                dec.feed(piece)
            while (r := dec.next_request()) is not None:
                got.append(r._replace(payload=None if r.payload is None else bytes(r.payload)))
            assert dec.buffered() < 28 + tx._DIRECT_MIN
    except ProtocolError:
        failed = True
    assert got == expected
    assert failed == must_fail


def test_reference_decoder_is_not_trivial() -> None:
    """The oracle itself: it must see requests, payloads, drains and bad magic."""
    rng = random.Random(0)
    w = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 1, 0, 3) + b"abc"
    big = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.WRITE, 2, 0, 1500) + rng.randbytes(1500)
    got, fail = nc.reference_decode(w + big + b"\xde\xad" * 14, 1024, 2048)
    assert [r.payload for r in got] == [b"abc", None] and fail
