"""Errors that name the file, and no output that hides them: a TLS file that is not
there, a check that could not run, a convert whose source is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import need


def tapnbd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tapnbd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_serve_names_the_missing_tls_file(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        files = {"--tls-cert": str(key), "--tls-key": str(key), "--tls-ca": str(key)}
        files[flag] = "/nonexist.pem"
        args = [a for f, p in files.items() for a in (f, p)]
        proc = tapnbd("serve", "ram:1M", "--tls", "require", "--port", "0", *args, cwd=tmp_path)
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"tapnbd: {flag} /nonexist.pem: No such file or directory"
    # There, but not PEM: both files named.
    proc = tapnbd(
        "serve", "ram:1M", "--tls", "require", "--port", "0",
        "--tls-cert", str(key), "--tls-key", str(key), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and f"--tls-cert {key} / --tls-key {key}" in proc.stderr


def test_check_that_could_not_run_prints_no_summary(tmp_path: Path) -> None:
    need("qemu-img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "q2.qcow2", "16M"], cwd=tmp_path)
    proc = tapnbd("check", "--format", "qcow", "q2.qcow2", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.startswith("ERROR: ") and "qcow2" in proc.stdout
    assert "allocated" not in proc.stdout and "end offset" not in proc.stdout, proc.stdout
    # A check that ran still ends with its summary.
    ok = tapnbd("check", "q2.qcow2", cwd=tmp_path)
    assert ok.returncode == 0 and "clusters allocated" in ok.stdout


def test_convert_of_a_missing_file_draws_no_bar(tmp_path: Path) -> None:
    proc = tapnbd("convert", "missing.img", "out.qcow", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == "tapnbd: missing.img: no such file or device\n", proc.stderr
    assert not (tmp_path / "out.qcow").exists()
    # One that works still shows its bar (stderr, the finished line).
    (tmp_path / "src.img").write_bytes(bytes(65536))
    done = tapnbd("convert", "src.img", "out.qcow", cwd=tmp_path)
    assert done.returncode == 0 and "out.qcow" in done.stderr, done.stderr
