"""DKIM body hashes streamed from the spool file: the body canonicalizations of RFC 6376 3.4.3
(simple) and 3.4.4 (relaxed), byte for byte as dkimpy computes them, over blocks of the body, so
that verifying a signature never holds the body (dkimpy's relaxed canonicalization of a whole
body builds a list of every word: about 40 bytes of memory per byte of prose).

The input is the spool's body: CRLF-clean (every CR followed by LF, every LF preceded by CR), as
gateway.message.Message guarantees. Blocks are cut after their last CRLF, so a run of white space
never straddles two blocks; CRLFs at the end of a block are held back until content follows
(trailing empty lines are dropped, RFC 6376 3.4.3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

BLOCK = 64 * 1024
_CRLF = b"\r\n"
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")


def _relax(data: bytes) -> bytes:
    if b"\t" not in data and b"  " not in data and b" \r\n" not in data:
        return data  # every run of white space is one space inside a line: nothing to do
    return _WSP.sub(b" ", _TRAILING_WSP.sub(_CRLF, data))


def _crlfs(n: int) -> Iterator[bytes]:
    while n > 0:
        k = min(n, BLOCK // 2)
        yield _CRLF * k
        n -= k


def canonical_body(blocks: Iterable[bytes], relaxed: bool) -> Iterator[bytes]:
    """The canonical body, in pieces, of a CRLF-clean body given in pieces of any size."""
    carry = b""
    pending = 0  # CRLFs held back: trailing empty lines unless content follows them
    started = False
    for block in blocks:
        data = carry + block if carry else block
        cut = data.rfind(_CRLF)
        if cut < 0:
            carry = data
            continue
        lines, carry = data[:cut + 2], data[cut + 2:]
        if relaxed:
            lines = _relax(lines)
        core = lines.rstrip(b"\r\n")
        if core:
            yield from _crlfs(pending)
            yield core
            pending, started = (len(lines) - len(core)) // 2, True
        else:
            pending += len(lines) // 2
    if relaxed and carry:
        carry = _WSP.sub(b" ", carry)
    if carry:  # a last line without CRLF: it gets one
        yield from _crlfs(pending)
        yield carry
        yield _CRLF
    elif started or not relaxed:  # one CRLF ends the body; an empty simple body is CRLF
        yield _CRLF


def body_hash(blocks: Iterable[bytes], relaxed: bool, hasher: Callable[[], Any],
              length: int | None = None) -> bytes:
    """The digest of the canonical body, cut at ``length`` bytes (the l= tag) if given."""
    h = hasher()
    left = length
    for piece in canonical_body(blocks, relaxed):
        if left is not None:
            piece = piece[:left]
            left -= len(piece)
        h.update(piece)
        if left == 0:
            break
    return bytes(h.digest())
