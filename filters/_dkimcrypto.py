"""dkimpy's RSA arithmetic, made fast: linear integer <-> bytes conversions, and modular
exponentiation in OpenSSL.

``dkim.crypto.int2str`` and ``str2int`` move one byte per loop turn and shift the whole
number each time: quadratic in the key size. Every RSA verification (and signature) runs them
three times on 256-byte numbers, 20-30 us each (about half as much again as the modular
exponentiation). ``int.to_bytes`` / ``int.from_bytes`` give the same results
(tests/filters/test_dkim.py compares them) in well under a microsecond.

dkimpy's RSA operations are Python's ``pow(base, exp, mod)``: about 140 us for a 2048-bit
public-key operation (one per signature verified, DKIM or ARC) and 6 ms for a private-key one
(two ``pow`` of 1024 bits, CRT; one per DKIM signature made, two per ARC seal). ``powmod``
gives the same numbers through OpenSSL: ``BN_mod_exp_mont_consttime`` for a long exponent
(a private key's: no timing that depends on it), ``BN_mod_exp`` for a short one (a public
key's) or an even modulus; about 30 us and 0.65 ms, calls included
(tests/filters/test_dkimcrypto.py compares it with ``pow``). It is reached through ctypes,
holding the GIL, in the libcrypto that Python's ``_hashlib`` already has loaded, so it adds no
library to the process (the ``cryptography`` package would have added 6.5 MB of RSS to each
worker, gmpy2 8 MB); where that libcrypto or its symbols are missing, or for anything but
non-negative integers with a modulus above 1, it is the built-in ``pow``. Installed as ``pow`` in ``dkim.crypto``'s namespace (dkimpy's only
modular exponentiations: ``rsa_encrypt`` and ``rsa_decrypt``), whose code is otherwise
unchanged: the padding checks, the comparisons and the errors stay dkimpy's own.

Importing this module installs both in ``dkim.crypto``; filters/_dkimkeys.py imports it, so
every DKIM and ARC filter (verifying and signing) gets them.
"""

from __future__ import annotations

import builtins
import ctypes
from collections.abc import Callable
from typing import Any

import dkim.crypto


def int2str(n: int, length: int = -1) -> bytearray:
    """``n`` big-endian: the fewest bytes (at least one) when ``length`` < 0, else exactly
    ``length`` bytes (its low ones, as dkimpy's loop keeps)."""
    assert n >= 0
    if length < 0:
        return bytearray(_bytes(n))
    return bytearray((n & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))


def _bytes(n: int) -> bytes:
    """``n >= 0`` big-endian in the fewest bytes (at least one)."""
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def str2int(s: bytes | bytearray) -> int:
    """Big-endian bytes as a non-negative integer (0 for none)."""
    return int.from_bytes(s, "big")


class _LibCrypto:
    """The bignum calls of the process's libcrypto (found through ``_hashlib``'s links)."""

    def __init__(self) -> None:
        import _hashlib  # OpenSSL's hashes: CPython links it against libcrypto

        # dlsym searches its dependencies too. PyDLL: the GIL is kept during the calls (each
        # release would be a hand-off to the fsync thread; the longest call is ~0.3 ms)
        lib = ctypes.PyDLL(_hashlib.__file__)
        ptr, int_ = ctypes.c_void_p, ctypes.c_int
        self.ctx_new = self._fn(lib.BN_CTX_new, ptr, [])
        self.ctx_free = self._fn(lib.BN_CTX_free, None, [ptr])
        self.new = self._fn(lib.BN_new, ptr, [])
        self.free = self._fn(lib.BN_clear_free, None, [ptr])
        self.bin2bn = self._fn(lib.BN_bin2bn, ptr, [ctypes.c_char_p, int_, ptr])
        self.bn2binpad = self._fn(lib.BN_bn2binpad, int_, [ptr, ctypes.c_char_p, int_])
        self.mod_exp = self._fn(lib.BN_mod_exp, int_, [ptr] * 5)
        self.mod_exp_ct = self._fn(lib.BN_mod_exp_mont_consttime, int_, [ptr] * 6)
        self.clear_errors = self._fn(lib.ERR_clear_error, None, [])

    @staticmethod
    def _fn(fn: Any, restype: Any, argtypes: list[Any]) -> Callable[..., Any]:
        fn.restype, fn.argtypes = restype, argtypes
        return fn

    def powmod(self, base: int, exp: int, mod: int) -> int:
        """``base ** exp % mod`` for ints ``base, exp >= 0``, ``mod > 1``."""
        size = (mod.bit_length() + 7) // 8
        nums = [_bytes(base % mod), _bytes(exp), mod.to_bytes(size, "big")]
        ctx, bns = self.ctx_new(), []
        try:
            if not ctx:
                raise MemoryError("BN_CTX_new")
            for raw in nums:
                bn = self.bin2bn(raw, len(raw), None)
                if not bn:
                    raise MemoryError("BN_bin2bn")
                bns.append(bn)
            out = self.new()
            if not out:
                raise MemoryError("BN_new")
            bns.append(out)
            b, e, m = bns[:3]
            ok = (self.mod_exp_ct(out, b, e, m, ctx, None) if mod & 1 and exp >> 64
                  else self.mod_exp(out, b, e, m, ctx))  # a public exponent: no secret
            buf = ctypes.create_string_buffer(size)
            if not ok or self.bn2binpad(out, buf, size) != size:
                self.clear_errors()  # not left for the next OpenSSL user to report
                raise ArithmeticError("BN_mod_exp failed")
            return int.from_bytes(buf.raw, "big")
        finally:
            for bn in bns:
                self.free(bn)
            if ctx:
                self.ctx_free(ctx)


def _load() -> _LibCrypto | None:
    try:
        return _LibCrypto()
    except (ImportError, OSError, AttributeError):  # no _hashlib, no libcrypto, an old one
        return None


_LIB = _load()


def powmod(base: Any, exp: Any = None, mod: Any = None) -> Any:
    """``pow``, with ``pow(base, exp, mod)`` of non-negative ints (``mod`` > 1) in OpenSSL."""
    if (_LIB is None or type(base) is not int or type(exp) is not int or type(mod) is not int
            or base < 0 or exp < 0 or mod <= 1):
        return builtins.pow(base, exp, mod)
    return _LIB.powmod(base, exp, mod)


ORIGINAL = (dkim.crypto.int2str, dkim.crypto.str2int)  # for the tests' comparison
dkim.crypto.int2str, dkim.crypto.str2int = int2str, str2int
dkim.crypto.pow = powmod  # a module global: found before the builtin
