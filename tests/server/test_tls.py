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
