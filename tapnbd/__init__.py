"""tapnbd: Xen blktap's toolset on today's plumbing.

An asyncio NBD server and a Xen blkif ring shim over one Backend and pluggable disk
drivers (raw, ram, qcow), with a control daemon, local attach, and image tools.
"""

__version__ = "0.1.0"
