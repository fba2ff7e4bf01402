"""Hostile and malformed input: the offender loses its own connection, nobody else does."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest

from tests.helpers import Server, fio_verify, nbdsh_script, need, open_fds, run, wait_fds
from tests.server import rawclient as rc


def addr(server: Server) -> tuple[str, int]:
    u = urlparse(server.uri)
    assert u.hostname and u.port
    return u.hostname, u.port


def still_serves(server: Server) -> None:
    """Another client is served normally."""
    need("nbdinfo")
    run(["nbdinfo", "--size", server.uri])


def test_garbage_and_truncated_handshakes(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M")
    host, port = addr(server)
    for payload in (os.urandom(4096), b"\0\0", b"IHAVEOPT" * 3, b"", bytes(10000)):
        s = rc.connect(host, port)
        rc.recv_exact(s, 18)
        s.sendall(payload)
        s.close()
    # Unknown client flags: "The server MUST drop the connection".
    s = rc.connect(host, port)
    rc.greet(s, client_flags=0xFF)
    assert rc.closed_by_peer(s)
    # Bad option magic.
    s = rc.connect(host, port)
    rc.greet(s)
    s.sendall(b"NOTMAGIC" + struct.pack(">II", 7, 0))
    assert rc.closed_by_peer(s)
    # An option claiming 1 GiB of data is refused at once, not buffered.
    s = rc.connect(host, port)
    rc.greet(s)
    s.sendall(rc.IHAVEOPT + struct.pack(">II", 7, 1 << 30))
    assert rc.closed_by_peer(s, within=2)
    still_serves(server)


def test_unknown_option_gets_err_unsup_and_haggling_goes_on(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M")
    s = rc.connect(*addr(server))
    rc.greet(s)
    rc.send_option(s, 99, b"some data the server must skip")
    opt, rep, _ = rc.read_reply(s)
    assert (opt, rep) == (99, rc.ERR_UNSUP)
    rc.send_option(s, rc.OPT_STARTTLS)  # TLS is off here
    assert rc.read_reply(s)[1] == rc.ERR_POLICY
    rc.send_option(s, rc.OPT_LIST, b"x")  # LIST takes no data
    assert rc.read_reply(s)[1] == rc.ERR_INVALID
    long_name = b"n" * 5000
    rc.send_option(s, rc.OPT_GO, struct.pack(">I", len(long_name)) + long_name + b"\0\0")
    assert rc.read_reply(s)[1] == rc.ERR_INVALID  # names are at most 4096 bytes
    rc.send_option(s, rc.OPT_GO, struct.pack(">I", 3) + b"bad" + b"\0\0")
    assert rc.read_reply(s)[1] == rc.ERR_UNKNOWN
    rc.send_option(s, rc.OPT_GO, struct.pack(">I", 200) + b"short")  # lengths disagree
    assert rc.read_reply(s)[1] == rc.ERR_INVALID
    size, flags = rc.go(s, "ram")
    assert size == 1 << 20 and flags & 1
    rc.request(s, rc.CMD_READ, 0, 512)
    assert rc.simple_reply(s, 512) == (0, 1, bytes(512))


def test_too_many_options_drops_the_client(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M")
    s = rc.connect(*addr(server))
    rc.greet(s)
    s.sendall((rc.IHAVEOPT + struct.pack(">II", 99, 0)) * 300)
    replies = 0
    try:
        while True:
            rc.read_reply(s)
            replies += 1
    except (ConnectionError, OSError):
        pass
    assert replies == 256
    still_serves(server)


def test_export_name_with_and_without_no_zeroes(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M")
    for client_flags, expected in ((1, 134), (3, 10)):
        s = rc.connect(*addr(server))
        rc.greet(s, client_flags)
        rc.send_option(s, rc.OPT_EXPORT_NAME, b"ram")
        answer = rc.recv_exact(s, expected)
        size, flags = struct.unpack(">QH", answer[:10])
        assert size == 1 << 20 and flags & 1
        assert answer[10:] == bytes(expected - 10)
        rc.request(s, rc.CMD_READ, 0, 16)
        assert rc.simple_reply(s, 16)[0] == 0
    # Unknown export on EXPORT_NAME: there is no error reply, so the server hangs up.
    s = rc.connect(*addr(server))
    rc.greet(s)
    rc.send_option(s, rc.OPT_EXPORT_NAME, b"nope")
    assert rc.closed_by_peer(s)


def test_refused_writes_are_drained_and_stream_stays_in_sync(
    serve: Callable[..., Server], raw_image: Path
) -> None:
    ro = serve(str(raw_image), "--read-only")
    s = rc.connect(*addr(ro))
    rc.greet(s)
    rc.go(s)
    rc.request(s, rc.CMD_WRITE, 0, 4096, cookie=7, payload=b"\xff" * 4096)
    rc.request(s, rc.CMD_READ, 0, 4096, cookie=8)
    assert rc.simple_reply(s) == (errno.EPERM, 7, b"")
    assert rc.simple_reply(s, 4096) == (0, 8, bytes(4096))
    rw = serve("ram:64M")
    s = rc.connect(*addr(rw))
    rc.greet(s)
    rc.go(s)
    # Over the 32 MiB payload limit: read to the end, refused, connection kept.
    big = 40 << 20
    rc.request(s, rc.CMD_WRITE, 0, big, cookie=9)
    s.sendall(b"\x01" * big)
    rc.request(s, rc.CMD_READ, 0, 8, cookie=10)
    assert rc.simple_reply(s) == (errno.EINVAL, 9, b"")
    assert rc.simple_reply(s, 8) == (0, 10, bytes(8))
    # Unknown command, flush with an offset: EINVAL, and on we go.
    rc.request(s, 42, 0, 0, cookie=11)
    rc.request(s, rc.CMD_FLUSH, 4096, 0, cookie=12)
    rc.request(s, rc.CMD_FLUSH, 0, 0, cookie=13)
    assert [rc.simple_reply(s)[:2] for _ in range(3)] == [
        (errno.EINVAL, 11),
        (errno.EINVAL, 12),
        (0, 13),
    ]
    # A payload too large even to drain (over 64 MiB) ends this client only.
    rc.request(s, rc.CMD_WRITE, 0, 1 << 30, cookie=14)
    assert rc.closed_by_peer(s)
    still_serves(rw)


def test_bad_request_magic_drops_only_that_client(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M")
    good = rc.connect(*addr(server))
    rc.greet(good)
    rc.go(good)
    bad = rc.connect(*addr(server))
    rc.greet(bad)
    rc.go(bad)
    bad.sendall(b"\xde\xad\xbe\xef" + bytes(24))
    assert rc.closed_by_peer(bad)
    rc.request(good, rc.CMD_READ, 0, 4, cookie=5)
    assert rc.simple_reply(good, 4) == (0, 5, bytes(4))


def test_pipelined_requests_all_answered(serve: Callable[..., Server], raw_image: Path) -> None:
    server = serve(str(raw_image))
    s = rc.connect(*addr(server))
    rc.greet(s)
    rc.go(s)
    blob = b""
    for i in range(100):
        blob += struct.pack(">IHHQQI", rc.REQUEST_MAGIC, 0, rc.CMD_WRITE, 1000 + i, i * 4096, 4096)
        blob += bytes([i]) * 4096
    s.sendall(blob)
    cookies = {rc.simple_reply(s)[1] for _ in range(100)}
    assert cookies == {1000 + i for i in range(100)}
    for i in range(100):
        rc.request(s, rc.CMD_READ, i * 4096, 4096, cookie=i)
    got = {}
    for _ in range(100):
        err, cookie, data = rc.simple_reply(s, 4096)
        assert err == 0
        got[cookie] = data
    assert all(got[i] == bytes([i]) * 4096 for i in range(100))
    rc.request(s, rc.CMD_DISC, 0, 0)
    assert rc.closed_by_peer(s)


def test_handshake_timeout_and_connection_cap(serve: Callable[..., Server]) -> None:
    server = serve("ram:1M", "--max-connections", "3", "--handshake-timeout", "1.5")
    host, port = addr(server)
    base_fds = open_fds(server.proc.pid)
    stalled = [rc.connect(host, port) for _ in range(3)]
    for s in stalled:
        rc.recv_exact(s, 18)  # greeted, then silent
    extra = rc.connect(host, port)
    # Refused over the cap: closed with no greeting (a client admitted later, or one
    # reclaimed by the timeout, would have been greeted first).
    assert extra.recv(18) == b""
    for s in stalled:
        assert rc.closed_by_peer(s, within=30)  # reclaimed by the handshake timeout
    # Once the server has let go of them, there is room again.
    assert wait_fds(server.proc.pid, base_fds) <= base_fds
    still_serves(server)


def test_stalled_handshakes_cannot_lock_out_real_clients(serve: Callable[..., Server]) -> None:
    """Unfinished handshakes have their own, lower cap (4 here, of 8 connections): past
    it the oldest is dropped, so stallers that fill every slot they can get never keep
    a client that completes its handshake out. (With only the connection cap, 8
    stallers refused everyone until the handshake timeout, here a minute.)"""
    server = serve(
        "ram:1M",
        "--max-connections",
        "8",
        "--max-handshakes",
        "4",
        "--handshake-timeout",
        "60",
        "--handshake-grace",
        "0",  # no young handshake is spared (test_handshake_burst checks the grace)
        "--verbose",
    )
    host, port = addr(server)
    stalled = [rc.connect(host, port) for _ in range(8)]
    for s in stalled:
        assert rc.recv_exact(s, 18)[:8] == rc.NBDMAGIC  # greeted, then silent
    server.wait_for_log("unfinished handshakes: dropping the oldest", count=4)
    script = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x07" * 4096, 0)
print(json.dumps(h.pread(4096, 0) == b"\x07" * 4096))
"""
    assert nbdsh_script(script, server.uri) is True
    # The first four stallers were the ones dropped, as the later ones arrived.
    assert all(rc.closed_by_peer(s, within=5) for s in stalled[:4])
    for s in stalled:
        s.close()


def test_handshake_burst_is_not_dropped(serve: Callable[..., Server]) -> None:
    """Real clients connecting all at once (fio, 24 threads, 24 connections) may exceed
    the handshake cap: handshakes younger than the grace are never dropped."""
    server = serve("ram:32M", "--max-handshakes", "2")
    job = fio_verify(
        server.uri,
        "--thread",
        "--numjobs=24",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=2",
        "--size=1M",
        "--offset_increment=1M",
    )
    assert job["error"] == 0
    assert "dropping the oldest" not in server.stderr()


@pytest.mark.parametrize("slow", [True, False])
def test_slow_clients_do_not_delay_others(serve: Callable[..., Server], slow: bool) -> None:
    """A client is served while 50 others sit in the handshake: they are all still held
    (greeted, not closed) when it is done."""
    # 50 unfinished handshakes are what this test is about: above the default cap of 16.
    server = serve("ram:1M", "--handshake-timeout", "60", "--max-handshakes", "100")
    host, port = addr(server)
    socks = []
    for _ in range(50):
        s = socket.create_connection((host, port))
        if slow:
            s.sendall(b"\0")  # one byte of the client flags, then nothing
        socks.append(s)
    for s in socks:
        rc.recv_exact(s, 18)
    still_serves(server)
    assert not select.select(socks, [], [], 0)[0], "a waiting client was dropped"
    for s in socks:
        s.close()


NAME_PROBE = r"""
import errno, json, sys
import nbd

uri, names = sys.argv[1], json.loads(sys.argv[2])
res = {}
for name in names:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.set_export_name(name)
    try:
        h.opt_info()
        res[name] = ["OK", h.get_size()]
    except nbd.Error as e:
        res[name] = [errno.errorcode.get(e.errno, str(e.errno)), 0]
    h.opt_abort()
print(json.dumps(res))
"""


def test_export_names_never_become_paths(serve: Callable[..., Server], tmp_path: Path) -> None:
    """Names are looked up in the server's table; a path in one opens nothing."""
    need("nbdinfo")
    served = tmp_path / "served"
    served.mkdir()
    disk = served / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"S" * (3 << 20))  # a size no export has, to spot a leak
    server = serve(str(disk), "--name", "disk")
    names = [
        "../secret.img",
        "../../secret.img",
        str(secret),
        "secret.img",
        "/etc/passwd",
        "./disk",
        "disk/../disk",
        str(disk),
        "disk.img",
        "%2e%2e/secret.img",
    ]
    res = nbdsh_script(NAME_PROBE, server.uri, json.dumps([*names, "disk", ""]))
    assert isinstance(res, dict)
    # NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT, for every one of them.
    assert {n: res[n][0] for n in names} == dict.fromkeys(names, "ENOENT")
    assert res["disk"] == res[""] == ["OK", 1 << 20]
    # nbdinfo with such a name in the URI fails too, and the server never opened them.
    u = urlparse(server.uri)
    for name in ("..%2Fsecret.img", quote(str(secret), safe="")):
        assert run(["nbdinfo", f"nbd://{u.hostname}:{u.port}/{name}"], check=False).returncode
    fds = {
        os.readlink(f"/proc/{server.proc.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{server.proc.pid}/fd")
    }
    assert str(disk) in fds and str(secret) not in fds
    assert "/etc/passwd" not in fds
