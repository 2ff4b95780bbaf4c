"""The DKIM patches of dkimpy's internals (filters/_dkimcrypto.py, _dkimkeys.py, dkim.py's
spool body hashing) prove themselves before use: when one gives a wrong answer or a symbol it
relies on is gone, dkimpy's own path is used, one warning line names the patch, and DKIM still
verifies (good signatures pass, a changed body fails)."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import pytest

import filters.dkim as dkim_filter
from filters import _dkimcrypto, _dkimkeys, arc
from filters._dkimvectors import AR_MESSAGE, KEY_NAME, KEY_RECORD, PRIVATE_KEY
from gateway import patches
from tests.filters.test_dkim import DATA, crlf, names, results, run, signed
from tests.filters.test_dkim import ns as ns  # noqa: F401 - the fixture: the key records
from tests.support.patches import kept_patch_status, patch_warnings

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")


@pytest.fixture
def restored() -> Iterator[None]:
    """The patches as they were after the test (it re-installs some under injected faults)."""
    crypto = {k: vars(dkim.crypto)[k] for k in ("int2str", "str2int", "pow")
              if k in vars(dkim.crypto)}
    evaluate_pk, spool = dkim.evaluate_pk, dkim_filter.SPOOL_HASHING
    with kept_patch_status():
        yield
    vars(dkim.crypto).pop("pow", None)
    vars(dkim.crypto).update(crypto)
    dkim.evaluate_pk, dkim_filter.SPOOL_HASHING = evaluate_pk, spool
    _dkimkeys.evaluate_pk.cache_clear()


def still_verifies(tmp_path: Path, port: int) -> None:
    """The dkim filter on a signature made now (dkimpy signing: the private-key arithmetic) and
    on the same message with its body changed."""
    data = crlf((DATA / "test.message").read_bytes())
    for canon in ((b"simple", b"simple"), (b"relaxed", b"relaxed")):
        res, _ = run(tmp_path, signed(data, "test", "test.private", canon=canon), port)
        assert results(res) == [("example.com", "test", "pass")]
        res, _ = run(tmp_path, signed(data, "test", "test.private", canon=canon) + b"more\r\n",
                     port)
        assert names(res) == {"DKIM_FAIL"}


def test_all_dkim_patches_are_active_here():
    for name in ("dkimpy.int-bytes", "dkimpy.rsa-powmod", "dkimpy.evaluate-pk-cache",
                 "dkimpy.spool-body-hash"):
        assert patches.active(name), name
    assert dkim.crypto.int2str is _dkimcrypto.int2str
    assert dkim.crypto.pow is _dkimcrypto.powmod
    assert dkim.evaluate_pk is _dkimkeys.evaluate_pk
    assert dkim_filter.SPOOL_HASHING


def test_wrong_int2str_falls_back_to_dkimpys(tmp_path, ns, restored, monkeypatch, caplog):
    own = _dkimcrypto.ORIGINAL
    monkeypatch.setattr(dkim.crypto, "int2str", own[0])
    monkeypatch.setattr(dkim.crypto, "str2int", own[1])
    monkeypatch.setattr(_dkimcrypto, "int2str", lambda n, length=-1: bytearray(max(length, 1)))
    patches.forget("dkimpy.int-bytes")
    _dkimcrypto.install()
    assert patch_warnings(caplog) == ["patch dkimpy.int-bytes disabled, the library's own path is "
                                      "used: int2str of a 1-bit number, length -1: not dkimpy's"]
    assert dkim.crypto.int2str is own[0] and dkim.crypto.str2int is own[1]
    still_verifies(tmp_path, ns.port)


class _WrongLib:
    def powmod(self, base: int, exp: int, mod: int) -> int:
        return (builtins.pow(base, exp, mod) + 1) % mod


@pytest.mark.parametrize("fault", ["wrong answer", "missing symbol"])
def test_broken_openssl_powmod_falls_back_to_pow(tmp_path, ns, restored, monkeypatch, caplog,
                                                  fault):
    if fault == "wrong answer":
        monkeypatch.setattr(_dkimcrypto, "_LIB", _WrongLib())
        why = "OpenSSL's answer for a 17-bit exponent modulo a 2048-bit number is not pow's"
    else:  # a libcrypto without BN_mod_exp_mont_consttime
        real = _dkimcrypto.ctypes.PyDLL

        class NoConstTime:
            def __init__(self, path: str) -> None:
                self.lib = real(path)

            def __getattr__(self, name: str) -> Any:
                if name == "BN_mod_exp_mont_consttime":
                    raise AttributeError(name)
                return getattr(self.lib, name)

        monkeypatch.setattr(_dkimcrypto.ctypes, "PyDLL", NoConstTime)
        monkeypatch.setattr(_dkimcrypto, "_LIB", _dkimcrypto._load())
        why = "libcrypto's BN_mod_exp and friends were not found through _hashlib"
    monkeypatch.delattr(dkim.crypto, "pow")
    patches.forget("dkimpy.rsa-powmod")
    _dkimcrypto.install()
    assert patch_warnings(caplog) == [f"patch dkimpy.rsa-powmod disabled, the library's own path is "
                                      f"used: {why}"]
    assert "pow" not in vars(dkim.crypto)  # dkimpy's RSA: the built-in pow
    still_verifies(tmp_path, ns.port)


def test_changed_evaluate_pk_falls_back_to_dkimpys(tmp_path, ns, restored, monkeypatch,
                                                   caplog):
    own = _dkimkeys._evaluate_pk

    def evaluate_pk(name: Any, s: Any, *, strict: bool = False) -> Any:  # a new signature
        return own(name, s)

    monkeypatch.setattr(_dkimkeys, "_evaluate_pk", evaluate_pk)
    monkeypatch.setattr(dkim, "evaluate_pk", evaluate_pk)
    patches.forget("dkimpy.evaluate-pk-cache")
    patches.install("dkimpy.evaluate-pk-cache", _dkimkeys.check_evaluate_pk,
                    _dkimkeys._apply_evaluate_pk)
    assert patch_warnings(caplog) == ["patch dkimpy.evaluate-pk-cache disabled, the library's own "
                                      "path is used: dkim.evaluate_pk takes (name, s, strict), not "
                                      "(name, s)"]
    assert dkim.evaluate_pk is evaluate_pk
    still_verifies(tmp_path, ns.port)


@pytest.mark.parametrize("fault", ["wrong body hash", "hook gone"])
def test_broken_spool_body_hash_falls_back_to_dkimpys(tmp_path, ns, restored, monkeypatch,
                                                      caplog, fault):
    if fault == "wrong body hash":  # e.g. a change in dkimpy's relaxed canonicalization
        real = dkim_filter.body_hash
        monkeypatch.setattr(dkim_filter, "body_hash",
                            lambda blocks, relaxed, *a: real(blocks, not relaxed, *a))
        why = "the simple body hash of a known body is not dkimpy's"
    else:  # dkimpy no longer verifies through verify_sig_process
        monkeypatch.delattr(dkim.DomainSigner, "verify_sig_process")
        why = "dkim.DKIM.verify_sig_process is missing"
    patches.forget("dkimpy.spool-body-hash")
    dkim_filter.SPOOL_HASHING = patches.install("dkimpy.spool-body-hash",
                                                dkim_filter.check_spool_verifier)
    assert patch_warnings(caplog) == [f"patch dkimpy.spool-body-hash disabled, the library's own "
                                      f"path is used: {why}"]
    assert not dkim_filter.SPOOL_HASHING
    if fault == "wrong body hash":  # dkimpy reads and hashes the whole message itself
        still_verifies(tmp_path, ns.port)
        made: list[object] = []
        monkeypatch.setattr(dkim_filter._SpoolVerifier, "__init__",
                            lambda *a: made.append(a))
        still_verifies(tmp_path, ns.port)
        assert made == []


def test_the_checks_run_once_per_process(caplog):
    """Imported again (a reload, another filter), a patch is not checked or logged twice."""
    assert patches.install("dkimpy.spool-body-hash", lambda: "never run") is True
    assert patch_warnings(caplog) == []


# -- the ARC sealer (filters/arc.py _Arc over dkimpy's ARC internals) ----------------------------
def _sealed_validates() -> None:
    """The filter's seal() on the known message, validated by dkimpy."""
    sealer = arc.Sealer("selftest.invalid", "s1", PRIVATE_KEY, None)
    got = arc.seal(AR_MESSAGE, sealer, "mx.selftest.invalid")
    assert [n for n, _ in got] == ["ARC-Seal", "ARC-Message-Signature",
                                   "ARC-Authentication-Results"]
    sealed = b"".join(f"{n}:{v}".encode() for n, v in got) + AR_MESSAGE
    cv = dkim.ARC(sealed).verify(
        dnsfunc=lambda name, timeout=5: KEY_RECORD if name.rstrip(b".") == KEY_NAME else None)[0]
    assert cv == dkim.CV_Pass


@pytest.mark.parametrize("fault", ["gen_header signature", "different seal"])
def test_broken_arc_sealer_falls_back_to_dkimpys_sign(restored, monkeypatch, caplog, fault):
    if fault == "gen_header signature":  # a dkimpy whose gen_header grew a parameter
        own = dkim.ARC.gen_header

        def gen_header(self: Any, fields: Any, include_headers: Any, canon_policy: Any,
                       header_name: Any, pk: Any, tag_order: Any = None,
                       standardize: bool = False) -> Any:
            return own(self, fields, include_headers, canon_policy, header_name, pk, standardize)

        monkeypatch.setattr(dkim.ARC, "gen_header", gen_header)
        why = ("dkim.ARC.gen_header takes (self, fields, include_headers, canon_policy, "
               "header_name, pk, tag_order, standardize)")
    else:  # our A-R consolidation drifting from dkimpy's
        real = arc.consolidate
        monkeypatch.setattr(arc, "consolidate", lambda h, a: (real(h, a)[0][:1], real(h, a)[1]))
        why = "the seal of a known message is not dkimpy's own"
    made: list[object] = []
    monkeypatch.setattr(arc._Arc, "sign", lambda *a, **k: made.append(a) or [])
    patches.forget("dkimpy.arc-sealer")
    monkeypatch.setattr(arc, "ARC_SIGNER", patches.install("dkimpy.arc-sealer",
                                                           arc.check_arc_signer))
    if fault == "different seal":
        assert made  # the check did try ours
    assert patch_warnings(caplog) == [f"patch dkimpy.arc-sealer disabled, the library's own path is "
                                      f"used: {why}"]
    made.clear()
    _sealed_validates()  # dkimpy's own ARC.sign
    assert made == []


def test_arc_sealer_is_active_here():
    assert patches.active("dkimpy.arc-sealer") and arc.ARC_SIGNER
    _sealed_validates()
