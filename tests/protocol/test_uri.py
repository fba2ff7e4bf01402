"""URIs the server prints read back, through the nbd driver's parser, to what they name."""

from __future__ import annotations

import pytest

from formats.nbd import NbdUri
from tapnbd.protocol.uri import tcp_uri, unix_uri

ODD = ["disk", "a/b?c#d", "with space", "100%+&=", "ümlaut"]


@pytest.mark.parametrize("export", ODD)
@pytest.mark.parametrize("socket", ["/run/s.sock", "/tmp/my disks & 100%20+#1/s.sock"])
def test_unix_uri_round_trips(export: str, socket: str) -> None:
    uri = NbdUri.parse(unix_uri(export, socket))
    assert (uri.export, uri.socket, uri.tls) == (export, socket, False)


@pytest.mark.parametrize("export", ODD)
def test_tcp_uri_round_trips(export: str) -> None:
    uri = NbdUri.parse(tcp_uri(export, "::1", 10810, tls=True))
    assert (uri.export, uri.host, uri.port, uri.tls) == (export, "::1", 10810, True)
    assert tcp_uri("", "0.0.0.0", 1).startswith("nbd://localhost:1/")
