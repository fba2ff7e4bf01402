"""The control plane: a daemon that owns exports and attachments, and its client (S7).

blktap's blktapctrl, done the modern way. The daemon (``daemon.py``) listens on a unix
socket readable only by its owner and speaks typed request/reply pairs
(``messages.py``), one JSON line each way. It changes the ExportRegistry of the NBD
server it runs; a new NBD connection resolves its export once, so the data plane never
waits for the control plane. ``attach.py`` turns an export into a local block device
(the kernel nbd client, or nbdfuse plus a loop device); ``client.py`` is what the CLI
uses, starting the daemon when it is not running and cleaning up after one that died.
"""
