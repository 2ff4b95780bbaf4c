"""The one fsync helper everything durable shares (spool, Maildir, quarantine): a renamed file is
only on disk once its directory is fsync'd too."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group commit for one directory: concurrent callers of ``sync`` share fsyncs. A caller
    returns once an fsync that began after its call has finished, so every change it made to
    the directory before calling is durable; while one fsync runs, the callers that arrive
    meanwhile wait and are all covered by the next one. A failed fsync raises in its caller
    only; the others it would have covered try again themselves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._durable = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._durable < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running, covers = True, self._asked
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._durable = max(self._durable, covers)
