"""Durable Maildir writes: the ``maildir:`` transport and the quarantine store both use them.

A file is written to ``tmp/``, fsync'd, renamed into ``new/`` and the directory fsync'd before
the caller may answer 250 (the Maildir protocol, plus fsync for crash safety).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from gateway.durable import fsync_dir

_seq = 0


def ensure_maildir(root: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def unique_name(tag: str) -> str:
    global _seq
    _seq += 1
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{sec}.M{usec}P{os.getpid()}Q{_seq}_{tag}.{host}"


def deliver(root: Path, chunks: Iterable[bytes], tag: str) -> Path:
    """Write one message into the Maildir ``root``; returns its final path. Blocking: callers on
    the event loop run it in a thread."""
    ensure_maildir(root)
    name = unique_name(tag)
    tmp = root / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=256 * 1024) as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        final = root / "new" / name
        os.rename(tmp, final)
        fsync_dir(root / "new")
        return final
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
