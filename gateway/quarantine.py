"""Quarantine store: a message the policy quarantines is kept, fsync'd, with its envelope,
score, symbols and reason, in the quarantine directory (a Maildir plus a JSON record per qid).
Later work indexes it and adds release/delete commands."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.durable import fsync_dir
from gateway.relay import maildir


def store(directory: Path, qid: str, chunks: Iterable[bytes], meta: dict[str, Any]) -> Path:
    """Blocking (run in a thread). Returns the message file's path."""
    path = maildir.deliver(directory, chunks, qid)
    record_dir = directory / "records"
    record_dir.mkdir(parents=True, exist_ok=True)
    tmp = record_dir / f".{qid}.json.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({**meta, "qid": qid, "file": str(path.resolve())}, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, record_dir / f"{qid}.json")
    fsync_dir(record_dir)
    return path
