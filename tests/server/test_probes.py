"""Protocol probes with libnbd (nbdsh's Python bindings), strict mode off.

libnbd normally refuses to send bad requests; with strict mode off it sends them as
asked, so the server's answers to out-of-range, zero-length, wrongly flagged and
read-only requests can be checked against the spec's errnos. Every probe runs on one
connection, and the connection must still work after all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.helpers import Server, nbdsh_script

PROBES = r"""
import errno, json, sys
import nbd

uri, ro_uri = sys.argv[1], sys.argv[2]
res = {}

def probe(name, fn):
    try:
        out = fn()
        res[name] = "OK" if out is None or isinstance(out, (bytes, bytearray, int)) else out
    except nbd.Error as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))

h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
h.pwrite(b"\xaa" * 65536, 0)

probe("read_past_end", lambda: h.pread(4096, size))
probe("read_straddling_end", lambda: h.pread(8192, size - 4096))
probe("write_past_end", lambda: h.pwrite(b"x" * 512, size))
probe("zero_past_end", lambda: h.zero(4096, size))
probe("trim_past_end", lambda: h.trim(4096, size))
probe("cache_past_end", lambda: h.cache(4096, size))
probe("cache_over_max", lambda: h.cache((32 << 20) + 4096, 0))
probe("block_status_past_end", lambda: h.block_status(4096, size, lambda *a: 0))
probe("zero_length_read", lambda: h.pread(0, 0))
probe("zero_length_write", lambda: h.pwrite(b"", 0))
probe("zero_length_zero", lambda: h.zero(0, 0))
probe("unknown_flag", lambda: h.pread(512, 0, flags=1 << 7))
probe("no_hole_on_write", lambda: h.pwrite(b"x" * 512, 4096, flags=nbd.CMD_FLAG_NO_HOLE))
probe("req_one_on_read", lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_REQ_ONE))
probe("df_on_write", lambda: h.pwrite(b"x" * 512, 4096, flags=nbd.CMD_FLAG_DF))
probe("fast_zero_on_write", lambda: h.pwrite(b"x" * 512, 4096, flags=nbd.CMD_FLAG_FAST_ZERO))
probe("fua_on_read", lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_FUA))
probe("oversized_read", lambda: h.pread(40 << 20, 0))
probe("fast_zero", lambda: h.zero(65536, 1 << 20, flags=nbd.CMD_FLAG_FAST_ZERO))
probe("zero_no_hole_fua", lambda: h.zero(65536, 2 << 20, flags=nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA))
probe("write_fua", lambda: h.pwrite(b"y" * 4096, 3 << 20, flags=nbd.CMD_FLAG_FUA))
probe("trim", lambda: h.trim(65536, 4 << 20))
probe("flush", lambda: h.flush())
probe("cache", lambda: h.cache(65536, 0))
probe("df_read", lambda: len(h.pread(65536, 0, flags=nbd.CMD_FLAG_DF)))

chunks = []
def on_chunk(subbuf, offset, status, err):
    chunks.append([offset, len(subbuf), status])
    return 0
h.pread_structured(131072, 0, on_chunk)
res["structured_chunks"] = sorted(chunks)

extents = []
def on_extent(meta, offset, entries, err):
    extents.append(list(entries))
    return 0
h.block_status(size, 0, on_extent, flags=nbd.CMD_FLAG_REQ_ONE)
res["req_one_extents"] = extents
extents2 = []
h.block_status(size, 0, lambda m, o, e, err: extents2.append(list(e)) or 0)
res["extents"] = extents2

res["still_in_sync"] = h.pread(65536, 0) == b"\xaa" * 65536
h.shutdown()

r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
probe("ro_write", lambda: r.pwrite(b"x" * 512, 0))
probe("ro_trim", lambda: r.trim(512, 0))
probe("ro_zero", lambda: r.zero(512, 0))
probe("ro_read", lambda: r.pread(512, 0))
probe("ro_flush", lambda: r.flush())
r.shutdown()
print(json.dumps(res))
"""


def test_strict_mode_probes(serve: Callable[..., Server], raw_image: Path) -> None:
    rw = serve(str(raw_image))
    ro = serve(str(raw_image), "--read-only", "--share")  # a reader beside the writer
    res = nbdsh_script(PROBES, rw.uri, ro.uri)
    assert isinstance(res, dict)
    expected = {
        # NBD spec "Error values": read/trim past the end EINVAL, writes ENOSPC
        # (ENOSPC is for WRITE and WRITE_ZEROES only).
        "read_past_end": "EINVAL",
        "read_straddling_end": "EINVAL",
        "write_past_end": "ENOSPC",
        "zero_past_end": "ENOSPC",
        "trim_past_end": "EINVAL",
        "cache_past_end": "EINVAL",
        # CACHE is capped like READ, at the 32 MiB maximum payload.
        "cache_over_max": "EINVAL",
        "block_status_past_end": "EINVAL",
        # Zero-length requests: unspecified, so succeed without disconnecting.
        "zero_length_read": "OK",
        "zero_length_write": "OK",
        "zero_length_zero": "OK",
        # Unknown flags and flags on the wrong command: EINVAL.
        "unknown_flag": "EINVAL",
        "no_hole_on_write": "EINVAL",
        "req_one_on_read": "EINVAL",
        "df_on_write": "EINVAL",
        "fast_zero_on_write": "EINVAL",
        # FUA is accepted on any command once SEND_FUA is advertised.
        "fua_on_read": "OK",
        "oversized_read": "EINVAL",
        "fast_zero": "OK",
        "zero_no_hole_fua": "OK",
        "write_fua": "OK",
        "trim": "OK",
        "flush": "OK",
        "cache": "OK",
        "df_read": "OK",
        # Read-only export: writes EPERM, reads fine.
        "ro_write": "EPERM",
        "ro_trim": "EPERM",
        "ro_zero": "EPERM",
        "ro_read": "OK",
        "ro_flush": "OK",
        "still_in_sync": True,
    }
    assert {k: res[k] for k in expected} == expected
    # 64 KiB of data then a zero run sent as an OFFSET_HOLE chunk (status 2 = READ_HOLE).
    assert res["structured_chunks"] == [[0, 65536, 1], [65536, 65536, 2]]
    # REQ_ONE: exactly one extent, no longer than the request.
    assert len(res["req_one_extents"]) == 1 and len(res["req_one_extents"][0]) == 2
    # Full map: data at 0, then holes, in (length, flags) pairs covering the whole disk.
    pairs = res["extents"][0]
    assert pairs[1] == 0 and sum(pairs[0::2]) <= raw_image.stat().st_size


def test_structured_read_sends_holes(serve: Callable[..., Server]) -> None:
    server = serve("ram:8M")
    script = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x01" * 4096, 0)
chunks = []
h.pread_structured(8192, 0, lambda b, o, s, e: chunks.append([o, len(b), s]) or 0)
h.pread_structured(4096, 1 << 20, lambda b, o, s, e: chunks.append([o, len(b), s]) or 0)
print(json.dumps({"chunks": chunks, "sr": h.get_structured_replies_negotiated()}))
"""
    res = nbdsh_script(script, server.uri)
    assert isinstance(res, dict)
    assert res["sr"] is True
    # A data chunk for the written block, a hole chunk (status 2) for the empty one.
    assert [0, 8192, 1] in res["chunks"]
    assert [1 << 20, 4096, 2] in res["chunks"]


def test_simple_replies_without_structured(serve: Callable[..., Server]) -> None:
    server = serve("ram:8M")
    script = r"""
import json, sys, nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
h.pwrite(b"\x05" * 4096, 4096)
ok = h.pread(4096, 4096) == b"\x05" * 4096
print(json.dumps({"ok": ok, "sr": h.get_structured_replies_negotiated(),
                  "df": h.can_df(), "meta": h.can_meta_context("base:allocation")}))
"""
    res = nbdsh_script(script, server.uri)
    # SEND_DF "MUST be clear when structured replies were not negotiated".
    assert res == {"ok": True, "sr": False, "df": False, "meta": False}


def test_option_haggling_with_opt_mode(serve: Callable[..., Server], raw_image: Path) -> None:
    server = serve(str(raw_image), "ram:1M", exports=2)
    script = r"""
import json, sys, nbd
res = {}
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, desc: names.append([name, desc]) or 0)
res["list"] = sorted(names)
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
res["contexts"] = ctxs
h.set_export_name("ram")
h.set_full_info(True)
h.opt_info()
res["info"] = [h.get_size(), h.get_canonical_export_name(), h.get_block_size(nbd.SIZE_MAXIMUM)]
h.set_export_name("no-such-export")
try:
    h.opt_info()
    res["unknown"] = "OK"
except nbd.Error as e:
    res["unknown"] = "error"
h.set_export_name("ram")
h.opt_go()
res["size"] = h.get_size()
h.shutdown()
a = nbd.NBD()
a.set_opt_mode(True)
a.connect_uri(sys.argv[1])
a.opt_abort()
res["aborted"] = a.aio_is_closed() or a.aio_is_dead()
print(json.dumps(res))
"""
    res = nbdsh_script(script, server.uri)
    assert isinstance(res, dict)
    assert [n for n, _ in res["list"]] == ["disk.img", "ram"]
    assert res["contexts"] == ["base:allocation"]
    assert res["info"] == [1 << 20, "ram", 32 << 20]
    assert res["unknown"] == "error"
    assert res["size"] == 1 << 20
    assert res["aborted"] is True
