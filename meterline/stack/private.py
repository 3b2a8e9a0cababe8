"""Billing data is private to the user running meterline: directories 0700, files 0600.

One-box mode (``meterline up``) keeps everything under ``data_dir`` (chDB files, ``stripe.sqlite``,
``api_keys.json``, ``admin.key``, ``runtime.json``, logs). Other local users must not read it
(docs/security.md). So the data directory and the embedded engine's directory are created 0700
(and tightened if they already exist), ``meterline up`` runs with umask 077 so whatever it and its
workers create is private, and secrets are written with ``os.open(..., 0o600)`` from the first
byte (never written first and chmod-ed after).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "private_dir", "write_private"]

PRIVATE_UMASK = 0o077


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) as 0700; an existing directory we own becomes 0700."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        with contextlib.suppress(PermissionError):
            os.chmod(p, 0o700)
    return p


def write_private(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, from creation on (O_CREAT 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have been created wider
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
