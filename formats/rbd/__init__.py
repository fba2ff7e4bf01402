"""Ceph RBD images as a driver: ``rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]``."""

from __future__ import annotations

from formats.rbd.spec import PREFIX, RbdSpec, is_rbd, parse

__all__ = ["PREFIX", "RbdSpec", "is_rbd", "parse"]
