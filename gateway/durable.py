"""The one fsync helper everything durable shares (spool, Maildir, quarantine): a renamed file is
only on disk once its directory is fsync'd too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
