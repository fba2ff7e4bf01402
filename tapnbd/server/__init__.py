"""The NBD front end: exports, the per-connection protocol shell, and listeners."""
