"""Queue IDs (gateway.qid): 16 Crockford base32 characters of milliseconds, process and
counter; the encoding checked against the digit-by-digit definition."""

from __future__ import annotations

import random
import time

from gateway import qid
from gateway.queue_entry import is_qid


def _by_digits(n: int) -> str:
    out = []
    for _ in range(16):
        n, r = divmod(n, 32)
        out.append(qid.ALPHABET[r])
    return "".join(reversed(out))


def test_the_encoding_is_crockford_base32_most_significant_digit_first() -> None:
    rng = random.Random(7)
    for n in [0, 1, 31, 32, 33, (1 << 80) - 1, *(rng.getrandbits(80) for _ in range(2000))]:
        assert qid._encode(n) == _by_digits(n), n


def test_ids_are_valid_unique_and_ordered_by_time() -> None:
    first = [qid.new_qid() for _ in range(500)]
    time.sleep(0.002)
    later = qid.new_qid()
    assert all(is_qid(q) and len(q) == 16 for q in [*first, later])
    assert len(set(first)) == len(first)
    assert max(first) < later
    sid = qid.new_session_id()
    assert sid.startswith("S") and len(sid) == 16
