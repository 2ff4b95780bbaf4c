"""dkimpy's integer <-> bytes conversions, made linear.

``dkim.crypto.int2str`` and ``str2int`` move one byte per loop turn and shift the whole
number each time: quadratic in the key size. Every RSA verification (and signature) runs them
three times on 256-byte numbers, 20-30 us each (about half as much again as the modular
exponentiation). ``int.to_bytes`` / ``int.from_bytes`` give the same results
(tests/filters/test_dkim.py compares them) in well under a microsecond. Importing this module
replaces the two functions in ``dkim.crypto``; filters/_dkimkeys.py imports it, so every DKIM
and ARC filter (verifying and signing) gets it.
"""

from __future__ import annotations

import dkim.crypto


def int2str(n: int, length: int = -1) -> bytearray:
    """``n`` big-endian: the fewest bytes (at least one) when ``length`` < 0, else exactly
    ``length`` bytes (its low ones, as dkimpy's loop keeps)."""
    assert n >= 0
    if length < 0:
        return bytearray(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
    return bytearray((n & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))


def str2int(s: bytes | bytearray) -> int:
    """Big-endian bytes as a non-negative integer (0 for none)."""
    return int.from_bytes(s, "big")


ORIGINAL = (dkim.crypto.int2str, dkim.crypto.str2int)  # for the tests' comparison
dkim.crypto.int2str, dkim.crypto.str2int = int2str, str2int
