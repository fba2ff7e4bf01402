"""Machinery shared by the table-mapped formats (QCOW v1, qcow2, VHD).

- ``table_cache``: an LRU of on-disk tables (L2 tables, refcount blocks, bitmaps) loaded
  on demand, with concurrent loads of one table merged, and tables with unwritten
  changes kept in memory (QEMU keeps ``qcow2-cache.c`` apart from the format in the same
  way);
- ``journal``: metadata writes in ordered stages, made durable as flush epochs;
- ``runs``: one run iterator, ``async for kind, host, n in runs(lookup, load, pos, end)``,
  that read, write, zero and block status all walk;
- ``backing``: reads and block status of what a backing file shows through holes;
- ``compressed``: deflate-compressed clusters (QCOW v1 and qcow2);
- ``image``: the driver set-up, capabilities and close every format shares, and the
  open sequence (image file, backing file, driver);
- ``opening``: the image file under a format, with the chain and trust checks;
- ``tables``: big-endian 64-bit table entries as host-order arrays;
- ``checks``: what ``check`` found (problems, cluster use, the result and exit code).
"""
