"""Queue IDs: unique, time-ordered, short, safe in file names and replies.

Layout: 48-bit milliseconds since the epoch, then a 32-bit value mixing the process ID with a
per-process counter, encoded as 16 characters of Crockford base32 (no I, L, O, U). IDs sort by
creation time; within a millisecond they stay unique per process.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_counter = itertools.count(int.from_bytes(os.urandom(2), "big"))
_lock = threading.Lock()


# RFC 4648 base32 writes 5-bit groups most significant first, as the IDs do: its output, its
# alphabet swapped for Crockford's, is the encoding (80 bits: 16 characters, no padding)
_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", ALPHABET.encode())


def _encode(n: int) -> str:
    return base64.b32encode(n.to_bytes(10, "big")).translate(_CROCKFORD).decode("ascii")


def new_qid() -> str:
    ms = int(time.time() * 1000) & ((1 << 48) - 1)
    with _lock:
        seq = next(_counter) & 0xFFFF
    tail = ((os.getpid() & 0xFFFF) << 16) | seq
    return _encode((ms << 32) | tail)


def new_session_id() -> str:
    """A connection's ID (used before any transaction has a qid)."""
    return "S" + new_qid()[1:]
