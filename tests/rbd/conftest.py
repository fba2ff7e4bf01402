"""A real single-node Ceph cluster for the rbd tests, started once per session."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rbd import cluster as ceph

_names = itertools.count()


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[ceph.Cluster]:
    missing = ceph.missing_binaries()
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs Ceph)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's OSD needs root")
    d = Path(tempfile.mkdtemp(prefix="tapnbd-ceph-", dir="/var/tmp"))
    try:
        cluster = ceph.start(d / "cluster")
    except BaseException:
        d.rmdir()
        raise
    old = os.environ.get("CEPH_CONF")
    os.environ["CEPH_CONF"] = str(cluster.conf)  # for every client the tests start
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("CEPH_CONF", None)
        else:
            os.environ["CEPH_CONF"] = old
        cluster.stop()
        d.rmdir()


@pytest.fixture
def rbd_image(ceph_cluster: ceph.Cluster) -> Iterator[str]:
    """A fresh 64 MiB image: its name as ``rbd:POOL/IMAGE``."""
    name = f"t{os.getpid()}-{next(_names)}"
    ceph_cluster.rbd("create", "--size", "64M", f"{ceph.POOL}/{name}")
    yield f"rbd:{ceph.POOL}/{name}"
