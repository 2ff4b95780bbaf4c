"""filters/_dkimbody.py: the streamed DKIM body hash equals dkimpy's own canonicalization and
hash of the whole body, for both canonicalizations, any cut into blocks and any l=."""

from __future__ import annotations

import hashlib
import random

import pytest
from dkim.canonicalization import CanonicalizationPolicy

from filters._dkimbody import body_hash

PIECES = [b"a", b"word", b" ", b"\t", b"  \t ", b"\r\n", b"\r\n\r\n", b"x y", b"\xc3\xa9",
          b".", b"-- ", b"=20"]


def _body(rng: random.Random) -> bytes:
    return b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 60)))


def _blocks(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 9)
        out.append(data[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("c", [b"simple/simple", b"relaxed/relaxed"])
def test_streamed_body_hash_equals_dkimpys(c: bytes) -> None:
    rng = random.Random(6376)
    canon = CanonicalizationPolicy.from_c_value(c)
    relaxed = c.endswith(b"relaxed")
    for _ in range(3000):
        body = _body(rng)
        if body and not body.endswith(b"\r\n") and rng.random() < 0.7:
            body += b"\r\n"  # the spool's bodies end with CRLF; some cases without
        whole = canon.canonicalize_body(body)
        length = rng.choice([None, 0, 1, 5, len(whole), len(whole) + 3])
        want = hashlib.sha256(whole if length is None else whole[:length]).digest()
        assert body_hash(_blocks(body, rng), relaxed, hashlib.sha256, length) == want, \
            (body, length)
