"""TLS with X.509 certificates, checked with libnbd (nbdinfo nbds://) and qemu-img."""

from __future__ import annotations

import errno
import json
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import Server, need, run
from tests.server import rawclient as rc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate.

    The file names are the ones libnbd and qemu look for in a certificates directory.
    """
    need("openssl")
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args: str) -> None:
        run(["openssl", *args], cwd=d)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tapnbd test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
    )
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        ossl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            f"{who}-key.pem",
            "-out",
            f"{who}.csr",
        )
        ossl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{who}.ext",
            "-out",
            f"{who}-cert.pem",
        )
    return d


def tls_args(pki: Path, mode: str, verify_clients: bool = False) -> list[str]:
    args = [
        "--tls",
        mode,
        "--tls-cert",
        str(pki / "server-cert.pem"),
        "--tls-key",
        str(pki / "server-key.pem"),
    ]
    if verify_clients:
        args += ["--tls-ca", str(pki / "ca-cert.pem")]
    return args


def tls_uri(server: Server, pki: Path) -> str:
    u = urlparse(server.uri)
    return f"nbds://localhost:{u.port}{u.path}?tls-certificates={pki}"


def test_tls_require_with_nbdinfo(serve: Callable[..., Server], pki: Path) -> None:
    need("nbdinfo")
    server = serve("ram:4M", *tls_args(pki, "require", verify_clients=True))
    assert server.uri.startswith("nbds://")
    info = json.loads(run(["nbdinfo", "--json", tls_uri(server, pki)]).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 << 20
    # A plaintext client gets nothing: every option but STARTTLS is refused.
    plain = server.uri.replace("nbds://", "nbd://")
    assert run(["nbdinfo", plain], check=False).returncode != 0


def test_tls_qemu_img_roundtrip(serve: Callable[..., Server], pki: Path, tmp_path: Path) -> None:
    need("qemu-img", "qemu-io")
    server = serve("ram:4M", *tls_args(pki, "require"))
    port = urlparse(server.uri).port
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}"
    spec = f"driver=nbd,host=localhost,port={port},export=ram,tls-creds=tls0"
    run(["qemu-io", "--object", obj, "--image-opts", spec, "-c", "write -P 0x5a 0 64k"])
    out = run(["qemu-io", "--object", obj, "--image-opts", spec, "-c", "read -P 0x5a 0 64k"]).stdout
    assert "verification failed" not in out


def test_tls_on_is_optional(serve: Callable[..., Server], pki: Path) -> None:
    need("nbdinfo")
    server = serve("ram:4M", *tls_args(pki, "on"))
    assert server.uri.startswith("nbd://")  # TLS offered, not required
    # libnbd's nbd:// does not ask for TLS; the server serves it in plaintext.
    assert json.loads(run(["nbdinfo", "--json", server.uri]).stdout)["TLS"] is False
    assert json.loads(run(["nbdinfo", "--json", tls_uri(server, pki)]).stdout)["TLS"] is True


def test_require_refuses_options_before_starttls(serve: Callable[..., Server], pki: Path) -> None:
    server = serve("ram:4M", *tls_args(pki, "require"))
    u = urlparse(server.uri)
    assert u.hostname and u.port
    s = rc.connect(u.hostname, u.port)
    rc.greet(s)
    for opt in (rc.OPT_LIST, rc.OPT_SR, rc.OPT_INFO, rc.OPT_GO, 99):
        data = struct.pack(">I", 0) + b"\0\0" if opt in (rc.OPT_INFO, rc.OPT_GO) else b""
        rc.send_option(s, opt, data)
        assert rc.read_reply(s)[1] == rc.ERR_TLS_REQD, opt
    rc.send_option(s, rc.OPT_EXPORT_NAME, b"ram")  # no way to refuse it but hanging up
    assert rc.closed_by_peer(s)


def test_starttls_forgets_earlier_negotiation(serve: Callable[..., Server], pki: Path) -> None:
    """CVE-2021-3716: a plaintext STRUCTURED_REPLY must not survive STARTTLS."""
    server = serve("ram:4M", *tls_args(pki, "on"))
    u = urlparse(server.uri)
    assert u.port
    s = rc.connect("127.0.0.1", u.port)
    rc.greet(s)
    rc.send_option(s, rc.OPT_SR)
    assert rc.read_reply(s)[1] == rc.REP_ACK  # negotiated in plaintext...
    rc.send_option(s, rc.OPT_STARTTLS)
    assert rc.read_reply(s)[1] == rc.REP_ACK
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    tls = ctx.wrap_socket(s, server_hostname="localhost")
    size, flags = rc.go(tls)
    assert size == 4 << 20
    assert not flags & (1 << 7)  # ...so no SEND_DF: structured replies were forgotten
    rc.request(tls, rc.CMD_READ, 0, 8, cookie=3)
    assert rc.simple_reply(tls, 8) == (0, 3, bytes(8))
    # And a client certificate is not needed unless --tls-ca was given.
    rc.request(tls, 42, 0, 0, cookie=4)
    assert rc.simple_reply(tls)[:2] == (errno.EINVAL, 4)


def test_data_pipelined_after_starttls_is_refused(serve: Callable[..., Server], pki: Path) -> None:
    server = serve("ram:4M", *tls_args(pki, "on"))
    u = urlparse(server.uri)
    assert u.port
    s = socket.create_connection(("127.0.0.1", u.port))
    rc.greet(s)
    # STARTTLS with plaintext GO glued on: injection, so the server hangs up.
    s.sendall(
        rc.IHAVEOPT
        + struct.pack(">II", rc.OPT_STARTTLS, 0)
        + rc.IHAVEOPT
        + struct.pack(">II", rc.OPT_GO, 6)
        + bytes(6)
    )
    assert rc.closed_by_peer(s)


def test_client_certificate_required_with_ca(
    serve: Callable[..., Server], pki: Path, tmp_path: Path
) -> None:
    need("nbdinfo")
    server = serve("ram:4M", *tls_args(pki, "require", verify_clients=True))
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    u = urlparse(server.uri)
    uri = f"nbds://localhost:{u.port}{u.path}?tls-certificates={nocert}"
    assert run(["nbdinfo", uri], check=False).returncode != 0
    assert run(["nbdinfo", "--size", tls_uri(server, pki)]).stdout.strip() == str(4 << 20)


OPT_LIST_META, OPT_SET_META = 9, 10
CMD_BLOCK_STATUS = 7


def _meta_request(export: str, *queries: str) -> bytes:
    raw = export.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def _structured_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """(type, cookie, payload) of one structured reply chunk."""
    magic, _flags, typ, cookie, length = struct.unpack(">IHHQI", rc.recv_exact(sock, 20))
    assert magic == rc.STRUCTURED_MAGIC, hex(magic)
    return typ, cookie, rc.recv_exact(sock, length)


def _block_status_after_tls(pki: Path, port: int, set_meta_before: bool) -> tuple[int, bytes]:
    """SR (+ SET_META_CONTEXT) in plaintext, STARTTLS, SR and GO over TLS, BLOCK_STATUS.

    Returns the reply chunk's type and payload. Only ``set_meta_before`` differs from
    a run where the context is selected after STARTTLS (the control).
    """
    s = rc.connect("127.0.0.1", port)
    rc.greet(s)
    rc.send_option(s, rc.OPT_SR)
    assert rc.read_reply(s)[1] == rc.REP_ACK
    if set_meta_before:
        rc.send_option(s, OPT_SET_META, _meta_request("ram", "base:allocation"))
        assert [rc.read_reply(s)[1] for _ in range(2)] == [4, rc.REP_ACK]  # META_CONTEXT, ACK
    rc.send_option(s, rc.OPT_STARTTLS)
    assert rc.read_reply(s)[1] == rc.REP_ACK
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    tls = ctx.wrap_socket(s, server_hostname="localhost")
    rc.send_option(tls, rc.OPT_SR)
    assert rc.read_reply(tls)[1] == rc.REP_ACK
    if not set_meta_before:
        rc.send_option(tls, OPT_SET_META, _meta_request("ram", "base:allocation"))
        assert [rc.read_reply(tls)[1] for _ in range(2)] == [4, rc.REP_ACK]
    size, flags = rc.go(tls, "ram")
    assert size == 4 << 20 and flags & (1 << 7)  # SEND_DF: structured replies, this time
    rc.request(tls, CMD_BLOCK_STATUS, 0, 65536, cookie=9)
    typ, cookie, payload = _structured_reply(tls)
    assert cookie == 9
    tls.close()
    return typ, payload


def test_starttls_forgets_a_meta_context_set_before_it(
    serve: Callable[..., Server], pki: Path
) -> None:
    """CVE-2021-3716's other half: base:allocation chosen in plaintext is gone after TLS."""
    server = serve("ram:4M", *tls_args(pki, "on"))
    port = urlparse(server.uri).port
    assert port
    typ, payload = _block_status_after_tls(pki, port, set_meta_before=True)
    assert typ == 0x8001, typ  # NBD_REPLY_TYPE_ERROR: no context was negotiated
    assert struct.unpack_from(">I", payload)[0] == errno.EINVAL
    # The control: the same context chosen after STARTTLS gives a BLOCK_STATUS chunk.
    typ, payload = _block_status_after_tls(pki, port, set_meta_before=False)
    assert typ == 5, typ
    context_id, length, flags = struct.unpack_from(">III", payload)
    assert context_id != 0 and length == 65536 and flags == 3  # a hole that reads as zeros


def test_require_refuses_every_option_before_starttls(
    serve: Callable[..., Server], pki: Path
) -> None:
    """Every option code but STARTTLS, ABORT and EXPORT_NAME gets ERR_TLS_REQD, well-formed
    or not; the client may still go on to STARTTLS and be served."""
    server = serve("ram:4M", *tls_args(pki, "require"))
    port = urlparse(server.uri).port
    assert port
    s = rc.connect("127.0.0.1", port)
    rc.greet(s)
    well_formed = {
        rc.OPT_INFO: struct.pack(">I", 3) + b"ram" + b"\0\0",
        rc.OPT_GO: struct.pack(">I", 3) + b"ram" + b"\0\0",
        OPT_LIST_META: _meta_request("ram", "base:allocation"),
        OPT_SET_META: _meta_request("ram", "base:allocation"),
    }
    codes = [c for c in range(13) if c not in (rc.OPT_EXPORT_NAME, rc.OPT_ABORT, rc.OPT_STARTTLS)]
    for code in [*codes, 99, 1 << 31, (1 << 32) - 1]:
        for data in {well_formed.get(code, b""), b"junk"}:
            rc.send_option(s, code, data)
            opt, rep, _ = rc.read_reply(s)
            assert (opt, rep) == (code, rc.ERR_TLS_REQD), (code, data)
    rc.send_option(s, rc.OPT_STARTTLS)
    assert rc.read_reply(s)[1] == rc.REP_ACK
    ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    tls = ctx.wrap_socket(s, server_hostname="localhost")
    assert rc.go(tls, "ram")[0] == 4 << 20
    rc.request(tls, rc.CMD_READ, 0, 8, cookie=2)
    assert rc.simple_reply(tls, 8) == (0, 2, bytes(8))


def test_tls_keeps_big_reads_on_the_loop(
    serve: Callable[..., Server], pki: Path, tmp_path: Path
) -> None:
    """Every byte of a TLS connection goes through the SSL object, so its big READs
    never go to the I/O threads, which write the socket; a plaintext one's do."""
    need("nbdcopy")
    disk, tls_out, plain_out = tmp_path / "d.img", tmp_path / "t.img", tmp_path / "p.img"
    data = bytes(range(256)) * (16 << 12)  # 16 MiB
    disk.write_bytes(data)
    server = serve(str(disk), "--format", "raw", "--verbose", *tls_args(pki, "on"))
    run(["nbdcopy", "--request-size=1048576", tls_uri(server, pki), str(tls_out)])
    assert tls_out.read_bytes() == data
    assert "big reads go to I/O threads" not in server.stderr()
    run(["nbdcopy", "--request-size=1048576", server.uri, str(plain_out)])
    assert plain_out.read_bytes() == data
    server.wait_for_log("big reads go to I/O threads")
