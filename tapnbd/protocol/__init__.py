"""The NBD protocol, sans I/O (in the manner of h11): bytes in, events and bytes out.

Nothing here imports asyncio or touches a socket, so every rule can be tested with plain
byte strings. ``handshake`` runs the fixed-newstyle option haggling; ``transmission``
decodes requests and encodes replies. The asyncio shell is tapnbd.server.connection.
"""
