"""filters/_dkimcrypto.py: dkimpy's modular exponentiation in OpenSSL gives ``pow``'s numbers,
and dkimpy signs and verifies through it with the same results."""

from __future__ import annotations

import base64
import builtins
import random

import dkim
import dkim.crypto
import pytest

from filters import _dkimcrypto

KEY = b"""-----BEGIN RSA PRIVATE KEY-----
%s
-----END RSA PRIVATE KEY-----
"""


def test_installed_as_dkimpys_pow() -> None:
    assert dkim.crypto.pow is _dkimcrypto.powmod
    assert _dkimcrypto._LIB is not None  # this machine's Python has libcrypto: the fast path


def test_powmod_gives_pows_numbers() -> None:
    rng = random.Random(8017)
    cases = [(0, 0, 2), (0, 5, 7), (1, 0, 7), (5, 0, 7), (7, 3, 7), (2, 10, 1024), (3, 1, 2),
             (2 ** 4096 + 1, 65537, 2 ** 2048 - 1), (12345, 2 ** 200 + 1, 2 ** 127 - 1),
             (12345, 2 ** 200 + 1, 2 ** 128), (2 ** 64, 2 ** 64, 2 ** 64 + 1)]
    for _ in range(300):
        mod = rng.getrandbits(rng.choice([2, 17, 64, 512, 1024, 2048, 4096])) | 2
        if rng.random() < 0.5:
            mod |= 1  # odd, like an RSA modulus or prime; the others take BN_mod_exp
        base = rng.getrandbits(rng.choice([1, 64, mod.bit_length(), mod.bit_length() + 9]))
        exp = rng.choice([3, 65537, rng.getrandbits(rng.choice([8, 64, 65, 1024, 2048]))])
        cases.append((base, exp, mod))
    for base, exp, mod in cases:
        assert _dkimcrypto.powmod(base, exp, mod) == builtins.pow(base, exp, mod), (base, exp, mod)


def test_anything_else_is_the_builtin_pow(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _dkimcrypto.powmod(3, 4) == 81 and _dkimcrypto.powmod(2.0, 3) == 8.0
    assert _dkimcrypto.powmod(-3, 3, 7) == builtins.pow(-3, 3, 7)
    assert _dkimcrypto.powmod(3, -1, 7) == builtins.pow(3, -1, 7) == 5
    assert _dkimcrypto.powmod(3, 5, 1) == 0
    assert _dkimcrypto.powmod(True, 5, 7) == 1
    with pytest.raises(ValueError):
        _dkimcrypto.powmod(3, 5, 0)
    with pytest.raises(ValueError):
        _dkimcrypto.powmod(2, -1, 4)  # no inverse, as pow says
    monkeypatch.setattr(_dkimcrypto, "_LIB", None)  # no libcrypto: pow throughout
    assert _dkimcrypto.powmod(7, 65537, 2 ** 127 - 1) == builtins.pow(7, 65537, 2 ** 127 - 1)


def test_the_fast_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _dkimcrypto._LIB
    assert lib is not None
    calls: list[str] = []
    for name in ("mod_exp", "mod_exp_ct"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    n = 2 ** 2048 - 159  # odd
    assert _dkimcrypto.powmod(5, 65537, n) == builtins.pow(5, 65537, n)
    assert _dkimcrypto.powmod(5, 2 ** 1000 + 7, n) == builtins.pow(5, 2 ** 1000 + 7, n)
    assert _dkimcrypto.powmod(5, 2 ** 1000 + 7, n + 1) == builtins.pow(5, 2 ** 1000 + 7, n + 1)
    assert calls == ["mod_exp", "mod_exp_ct", "mod_exp"]  # a long exponent: constant time


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + \
        n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + size + body


def _int(n: int) -> bytes:
    return _der(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _key_pair() -> tuple[bytes, bytes]:
    """An RSA key (PEM) and its DKIM record, from fixed primes (the test needs no key tool)."""
    rng = random.Random(6376)

    def prime(bits: int) -> int:
        while True:
            c = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
            if all(builtins.pow(a, c - 1, c) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23)) \
                    and (c - 1) % 65537:
                return c

    p, q, e = prime(1024), prime(1024), 65537
    d = builtins.pow(e, -1, (p - 1) * (q - 1))
    der = _der(0x30, b"".join(_int(x) for x in (0, p * q, e, d, p, q, d % (p - 1),
                                                 d % (q - 1), builtins.pow(q, -1, p))))
    pem = KEY % base64.encodebytes(der).strip()
    rsa_id = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + _der(0x05, b""))
    spki = _der(0x30, rsa_id + _der(0x03, b"\x00" + _der(0x30, _int(p * q) + _int(e))))
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


def test_dkimpy_signs_and_verifies_through_openssl(monkeypatch: pytest.MonkeyPatch) -> None:
    """dkim.sign/dkim.verify: the same signature as with the built-in pow, verified, and a
    changed body or signed header fails; the RSA operations went through OpenSSL."""
    pem, record = _key_pair()
    msg = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
           b"Date: Sun, 29 Nov 2026 20:00:00 +0000\r\n\r\nHello.\r\n")

    def dns(name: bytes, timeout: float = 5) -> bytes:
        return record if name == b"s._domainkey.example.com." else b""

    monkeypatch.setattr(dkim.time, "time", lambda: 1_796_000_000.0)  # the same t= each time
    lib = _dkimcrypto._LIB
    assert lib is not None
    calls: list[int] = []
    real = lib.powmod
    monkeypatch.setattr(lib, "powmod", lambda *a: calls.append(a[1].bit_length()) or real(*a))
    fast = dkim.sign(msg, b"s", b"example.com", pem, include_headers=[b"from", b"subject"])
    assert len(calls) == 2 and min(calls) > 1000  # the two CRT halves, private exponents
    assert dkim.verify(fast + msg, dnsfunc=dns) is True
    assert calls[2:] == [17]  # e = 65537
    assert dkim.verify(fast + msg.replace(b"Hello", b"Hullo"), dnsfunc=dns) is False  # bh=
    assert dkim.verify(fast + msg.replace(b": hi", b": ho"), dnsfunc=dns) is False  # b=
    assert calls[2:] == [17, 17]
    monkeypatch.setattr(dkim.crypto, "pow", builtins.pow)  # dkimpy as shipped
    slow = dkim.sign(msg, b"s", b"example.com", pem, include_headers=[b"from", b"subject"])
    assert slow == fast
    assert dkim.verify(fast + msg, dnsfunc=dns) is True
    assert len(calls) == 4


def test_a_failed_exponentiation_raises_and_clears_openssls_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _dkimcrypto._LIB
    assert lib is not None
    cleared: list[int] = []
    real_clear = lib.clear_errors
    monkeypatch.setattr(lib, "mod_exp", lambda *a: 0)
    monkeypatch.setattr(lib, "clear_errors", lambda: cleared.append(1) or real_clear())
    with pytest.raises(ArithmeticError):
        _dkimcrypto.powmod(5, 65537, 2 ** 127 - 1)
    assert cleared == [1]
    monkeypatch.undo()
    assert _dkimcrypto.powmod(5, 65537, 2 ** 127 - 1) == builtins.pow(5, 65537, 2 ** 127 - 1)
