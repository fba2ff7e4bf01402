"""The Xen blkfront path: a blkif shared-ring front end over the same Backend as NBD.

blkif (layout, sans I/O) -> ring (shared ring and its macros) -> grant (page sharing)
-> evtchn (notifications) -> xenstore (handshake) -> blkback (the ring data path),
xenbus (its handshake and states) and app (``ring serve``'s runner); frontend (BlkFront,
the client library).
"""
