"""Queue IDs: unique, time-ordered, short, safe in file names and replies.

Layout: 48-bit milliseconds since the epoch, then a 32-bit value mixing the process ID with a
per-process counter, encoded as 16 characters of Crockford base32 (no I, L, O, U). IDs sort by
creation time; within a millisecond they stay unique per process.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_counter = itertools.count(int.from_bytes(os.urandom(2), "big"))
_lock = threading.Lock()


def _encode(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 32)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def new_qid() -> str:
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    with _lock:
        seq = next(_counter) & 0xFFFF
    tail = ((os.getpid() & 0xFFFF) << 16) | seq
    return _encode((ms << 32) | tail, 16)


def new_session_id() -> str:
    """A connection's ID (used before any transaction has a qid)."""
    return "S" + new_qid()[1:]
