"""Machinery shared by the table-mapped formats (qcow2 now; QCOW v1 later).

- ``table_cache``: an LRU of on-disk tables (L2 tables, refcount blocks) loaded on
  demand, with concurrent loads of one table merged, and tables with unwritten changes
  kept in memory (QEMU keeps ``qcow2-cache.c`` apart from the format in the same way);
- ``journal``: metadata writes in ordered stages, made durable as flush epochs;
- ``runs``: one run iterator, ``async for kind, host, n in runs(lookup, load, pos, end)``,
  that read, write, zero and block status all walk;
- ``backing``: reads and block status of what a backing file shows through holes.
"""
