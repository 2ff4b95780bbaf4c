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
every DKIM and ARC filter (verifying and signing) gets them. Each is installed only once it has
given dkimpy's own answers for known numbers and dkimpy's functions are seen to still call the
names replaced (patches ``dkimpy.int-bytes`` and ``dkimpy.rsa-powmod``, gateway/patches.py);
otherwise dkimpy's own stay, with one warning line.
"""

from __future__ import annotations

import builtins
import ctypes
import random
from collections.abc import Callable
from typing import Any

import dkim.crypto

from gateway import patches


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


ORIGINAL = (getattr(dkim.crypto, "int2str", None), getattr(dkim.crypto, "str2int", None))


def _known_numbers() -> list[int]:
    rnd = random.Random(6376)
    return [0, 1, 255, 256, 65537, 2 ** 64, 2 ** 1024 - 1, rnd.getrandbits(2048) | 1 << 2047,
            rnd.getrandbits(1000)]


def check_conversions() -> str | None:
    """None when ``int2str``/``str2int`` answer as dkimpy's own for known numbers and dkimpy's
    RSA functions still call them; else why not."""
    own_i2s, own_s2i = ORIGINAL
    if not callable(own_i2s) or not callable(own_s2i):
        return "dkim.crypto.int2str or str2int is missing"
    for fn in ("rsa_decrypt", "rsa_encrypt"):
        if not patches.calls(getattr(dkim.crypto, fn, None), "int2str"):
            return f"dkim.crypto.{fn} no longer calls int2str"
    for n in _known_numbers():
        for length in (-1, 1, 3, 128, 256, 300):
            if bytes(int2str(n, length)) != bytes(own_i2s(n, length)):
                return f"int2str of a {n.bit_length()}-bit number, length {length}: not dkimpy's"
        raw = bytes(own_i2s(n, 260))
        if str2int(raw) != own_s2i(raw) or str2int(raw[3:]) != own_s2i(raw[3:]):
            return f"str2int of a {n.bit_length()}-bit number: not dkimpy's"
    return None


def _apply_conversions() -> None:
    dkim.crypto.int2str, dkim.crypto.str2int = int2str, str2int


def check_powmod() -> str | None:
    """None when OpenSSL's exponentiation is there and gives ``pow``'s numbers for known
    arguments (each of its paths) and dkimpy's RSA functions still call ``pow``; else why not."""
    if _LIB is None:
        return "libcrypto's BN_mod_exp and friends were not found through _hashlib"
    for fn in ("rsa_decrypt", "rsa_encrypt"):
        if not patches.calls(getattr(dkim.crypto, fn, None), "pow"):
            return f"dkim.crypto.{fn} no longer calls pow"
    rnd = random.Random(8017)
    m2048 = rnd.getrandbits(2048) | 1 << 2047 | 1
    m1024 = rnd.getrandbits(1024) | 1 << 1023 | 1
    cases = [(rnd.getrandbits(2048), 65537, m2048),  # a public-key operation
             (rnd.getrandbits(1100), rnd.getrandbits(1024) | 1 << 1023, m1024),  # private, CT
             (rnd.getrandbits(300), rnd.getrandbits(200), 2 ** 256),  # an even modulus
             (0, 5, 7), (12, 0, 7), (m1024 + 5, 3, m1024)]
    for base, exp, mod in cases:
        if powmod(base, exp, mod) != builtins.pow(base, exp, mod):
            return (f"OpenSSL's answer for a {exp.bit_length()}-bit exponent modulo a "
                    f"{mod.bit_length()}-bit number is not pow's")
    return None


def _apply_powmod() -> None:
    dkim.crypto.pow = powmod  # a module global: found before the builtin


def install() -> None:
    """Put both patches in dkimpy, each once it has proven itself (see the module docstring)."""
    patches.install("dkimpy.int-bytes", check_conversions, _apply_conversions)
    patches.install("dkimpy.rsa-powmod", check_powmod, _apply_powmod)


install()
