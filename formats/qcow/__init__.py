"""QCOW version 1, with blktap's Xen extension header (see ../shared/spec/blktap.md)."""
