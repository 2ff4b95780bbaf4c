"""The dkim filter: dkimpy's vectors verified with keys served by a DNS server on loopback."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import dkim
import pytest

from filters import _dkimkeys
from filters.dkim import DkimVerifyFilter
from gateway.dnsresolver import DnsResolver
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage
from gateway.message import Message
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from tests.support import tally
from tests.support.dnsserver import DnsServer, silent_udp_port

_ORIGINAL_EVALUATE_PK = _dkimkeys._evaluate_pk

DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")

BRISBANE = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
GMAIL = ("k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1Kd87/UeJjenpabgbFwh+eBCsSTrqmwIYYvy"
         "wlbhbqoo2DymndFkbjOVIPIldNs/m40KF+yzMn1skyoxcTUGCQs8g3FgD2Ap3ZB5DekAo5wMmk4wimDO+U8QzI3SD"
         "07y2+07wlNWwIt8svnxgdxGkVbbhzY8i+RQ9DpSVpPbF7ykQxtKXkv/ahW3KjViiAH+ghvvIhkx4xYSIc9oSwVmAl5"
         "OctMEeWUwg8Istjqz8BZeTWbf41fbNhte7Y+YqZOwq1Sd0DbvYAD9NOZK9vlfuac0598HY+vtSBczUiKERHv1yRbcaQ"
         "tZFh5wtiRrN04BLUTD21MycBX5jYchHjPY/wIDAQAB")


def corpus(name: str) -> str:
    return (DATA / name).read_text().strip()


def txt(name: str, value: str) -> str:
    chunks = " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))
    return f"{name}. 60 IN TXT {chunks}\n"


def zone() -> str:
    return "".join([
        txt("test._domainkey.football.example.com", corpus("test.txt")),
        txt("brisbane._domainkey.football.example.com", BRISBANE),
        txt("20120113._domainkey.gmail.com", GMAIL),
        txt("sed._domainkey.test.ex", corpus("eximtest.dns")),
        txt("test._domainkey.example.com", corpus("test.txt")),
        txt("ed._domainkey.example.com", corpus("ed25519test.dns")),
        txt("revoked._domainkey.example.com", "v=DKIM1; k=rsa; p="),
        txt("badk._domainkey.example.com", corpus("badk.txt")),
        txt("badversion._domainkey.example.com", corpus("badversion.txt")),
        txt("tlsrpt._domainkey.example.com", corpus("test_tlsrpt.txt")),
        "other._domainkey.example.com. 60 IN A 192.0.2.1\n",
    ])


@pytest.fixture(scope="module")
def ns() -> Any:
    with DnsServer(zone(), servfail=["broken._domainkey.example.com"]) as server:
        yield server


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def run(tmp_path: Path, data: bytes, port: int, **kw: Any) -> tuple[Result, float]:
    resolver = DnsResolver(DnsConfig(nameservers=(("127.0.0.1", port),),
                                     timeout_s=kw.pop("resolver_timeout_s", 2.0)))
    f = DkimVerifyFilter(resolver, **kw)
    path = tmp_path / "msg"
    path.write_bytes(crlf(data))
    msg = Message.from_spool(path, path.stat().st_size)
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 1), message=msg)
    t0 = time.monotonic()
    res = asyncio.run(f.on_message(ctx))
    return res, time.monotonic() - t0


def results(res: Result) -> list[tuple[str, str, str]]:
    return [(s["d"], s["s"], s["result"]) for s in res.data["signatures"]]


def names(res: Result) -> set[str]:
    return {s.name for s in res.symbols}


# -- the corpus's signed messages ----------------------------------------------------------------
VECTORS = [
    ("rfc6376.signed.msg", [("football.example.com", "brisbane", "pass"),
                            ("football.example.com", "test", "pass")]),
    ("rfc6376.signed.rsa.msg", [("football.example.com", "test", "pass")]),
    ("rfc6376.signed.no_t.msg", [("football.example.com", "test", "fail")]),
    ("test2.message", [("gmail.com", "20120113", "pass")]),
    ("ed25519test2.msg", [("test.ex", "sed", "pass")]),
]


def test_corpus_vectors(tmp_path, ns, capsys):
    passed = total = 0
    for name, expected in VECTORS:
        res, _ = run(tmp_path, (DATA / name).read_bytes(), ns.port)
        got = results(res)
        assert got == expected, (name, res.data["signatures"])
        total += len(got)
        passed += sum(1 for g, e in zip(got, expected, strict=True) if g == e)
    for _ in range(total):
        tally.record("DKIM vectors (dkimpy corpus, signatures)", True)
    tally.note("DKIM vectors (dkimpy corpus, signatures)",
               f"{sum(1 for _, e in VECTORS for x in e if x[2] == 'pass')} of them pass, "
               f"the rest fail as the corpus means them to")
    assert passed == total


def test_rfc8463_both_signatures_reported_with_options(tmp_path, ns):
    res, _ = run(tmp_path, (DATA / "rfc6376.signed.msg").read_bytes(), ns.port)
    assert [(s.name, s.options) for s in res.symbols] == [
        ("DKIM_PASS", ("d=football.example.com s=brisbane a=ed25519-sha256",
                       "d=football.example.com s=test a=rsa-sha256"))]
    assert res.data["signatures"][0]["aligned_domain"] == "football.example.com"


def test_baddomain_is_permerror(tmp_path, ns):
    res, _ = run(tmp_path, (DATA / "test.message.baddomain").read_bytes(), ns.port)
    assert names(res) == {"DKIM_PERMERROR"}


def test_modified_body_fails(tmp_path, ns):
    data = (DATA / "rfc6376.signed.rsa.msg").read_bytes() + b"appended line\n"
    res, _ = run(tmp_path, data, ns.port)
    assert names(res) == {"DKIM_FAIL"}
    assert "body hash" in res.data["signatures"][0]["reason"]


def test_modified_signed_header_fails(tmp_path, ns):
    data = (DATA / "rfc6376.signed.msg").read_bytes().replace(
        b"Subject: Is dinner ready?", b"Subject: Is lunch ready?", 1)
    assert data != (DATA / "rfc6376.signed.msg").read_bytes()
    res, _ = run(tmp_path, data, ns.port)
    assert [r for _, _, r in results(res)] == ["fail", "fail"]


def test_unsigned_message_is_none(tmp_path, ns):
    res, _ = run(tmp_path, (DATA / "test.message").read_bytes(), ns.port)
    assert [(s.name, s.options) for s in res.symbols] == [("DKIM_NONE", ())]
    assert res.data["signatures"] == []


# -- sign with the corpus keys, then verify ----------------------------------------------------
def signed(data: bytes, selector: str, key: str, *, domain: str = "example.com",
           algo: bytes = b"rsa-sha256", canon: tuple[bytes, bytes] = (b"relaxed", b"simple"),
           length: bool = False) -> bytes:
    sig = dkim.sign(data, selector.encode(), domain.encode(), (DATA / key).read_bytes(),
                    canonicalize=canon, signature_algorithm=algo, length=length,
                    include_headers=[b"from", b"to", b"subject"])
    return sig + data


@pytest.mark.parametrize("canon", [(b"simple", b"simple"), (b"simple", b"relaxed"),
                                   (b"relaxed", b"simple"), (b"relaxed", b"relaxed")])
@pytest.mark.parametrize("length", [False, True])
def test_sign_then_verify_rsa(tmp_path, ns, canon, length):
    data = crlf((DATA / "test.message").read_bytes())
    res, _ = run(tmp_path, signed(data, "test", "test.private", canon=canon, length=length),
                 ns.port)
    assert results(res) == [("example.com", "test", "pass")]
    res, _ = run(tmp_path, signed(data, "test", "test.private", canon=canon) + b"more\r\n",
                 ns.port)
    assert names(res) == {"DKIM_FAIL"}


def test_sign_then_verify_ed25519(tmp_path, ns):
    data = crlf((DATA / "test.message").read_bytes())
    res, _ = run(tmp_path, signed(data, "ed", "ed25519test.key", algo=b"ed25519-sha256"),
                 ns.port)
    assert [(s.name, s.options) for s in res.symbols] == [
        ("DKIM_PASS", ("d=example.com s=ed a=ed25519-sha256",))]


def test_two_signatures_one_good_one_bad_both_reported(tmp_path, ns):
    data = crlf((DATA / "test.message").read_bytes())
    good = signed(data, "test", "test.private")
    both = signed(good, "test", "1024_testkey.key", domain="example.com")  # wrong key for s=test
    res, _ = run(tmp_path, both, ns.port)
    assert [r for _, _, r in results(res)] == ["fail", "pass"]  # header order: newest on top
    assert names(res) == {"DKIM_PASS", "DKIM_FAIL"}


def test_a_key_record_is_parsed_once_and_a_bad_one_every_time(tmp_path, ns, monkeypatch):
    calls: list[bytes | str] = []

    def counting(name: bytes | str, s: bytes | str | None) -> Any:
        calls.append(s or b"")
        return _ORIGINAL_EVALUATE_PK(name, s)

    monkeypatch.setattr(_dkimkeys, "_evaluate_pk", counting)
    _dkimkeys.evaluate_pk.cache_clear()
    data = crlf((DATA / "test.message").read_bytes())
    res, _ = run(tmp_path, signed(data, "test", "test.private"), ns.port)
    assert results(res) == [("example.com", "test", "pass")]
    first = len(calls)
    assert first >= 1
    for _ in range(2):  # the same key again: no parse; a wrong signature still fails
        res, _ = run(tmp_path, signed(data, "test", "test.private"), ns.port)
        assert results(res) == [("example.com", "test", "pass")]
    res, _ = run(tmp_path, signed(data, "test", "1024_testkey.key"), ns.port)
    assert names(res) == {"DKIM_FAIL"}
    assert len(calls) == first
    for _ in range(2):  # a failing record is parsed (and fails) every time
        with pytest.raises(dkim.KeyFormatError):
            dkim.evaluate_pk(b"x._domainkey.example.com", b"v=DKIM1; k=rsa; p=")
    assert len(calls) == first + 2
    _dkimkeys.evaluate_pk.cache_clear()


# -- key problems ------------------------------------------------------------------------------
@pytest.mark.parametrize("selector,why", [
    ("missing", "no key record"),  # NXDOMAIN
    ("other", "no key record"),  # the name exists, no TXT (NODATA)
    ("revoked", "unusable key record"),  # empty p=
    ("badk", "unusable key record"),
    ("badversion", "unusable key record"),
    ("tlsrpt", "tlsrpt"),
])
def test_key_problems_are_permerror(tmp_path, ns, selector, why):
    data = signed(crlf((DATA / "test.message").read_bytes()), selector, "test.private")
    res, _ = run(tmp_path, data, ns.port)
    assert names(res) == {"DKIM_PERMERROR"}
    assert why in res.data["signatures"][0]["reason"]


def test_corrupt_key_does_not_pass(tmp_path):
    z = txt("test._domainkey.football.example.com", corpus("test_bad.txt"))
    with DnsServer(z) as bad:
        res, _ = run(tmp_path, (DATA / "rfc6376.signed.rsa.msg").read_bytes(), bad.port)
    assert names(res) & {"DKIM_FAIL", "DKIM_PERMERROR"} and "DKIM_PASS" not in names(res)


def test_servfail_is_temperror(tmp_path, ns):
    data = signed(crlf((DATA / "test.message").read_bytes()), "broken", "test.private")
    res, _ = run(tmp_path, data, ns.port)
    assert names(res) == {"DKIM_TEMPERROR"}


def test_dead_nameserver_is_temperror_within_the_deadline(tmp_path):
    data = signed(crlf((DATA / "test.message").read_bytes()), "test", "test.private")
    sock = silent_udp_port()
    try:
        res, took = run(tmp_path, data, sock.getsockname()[1], resolver_timeout_s=5.0,
                        dns_timeout_s=0.5)
    finally:
        sock.close()
    assert names(res) == {"DKIM_TEMPERROR"}
    assert "timed out" in res.data["signatures"][0]["reason"]
    assert took < 2.0  # the filter's dns_timeout_s, not the resolver's 5 s


def test_message_over_max_bytes_is_not_verified(tmp_path, ns):
    data = (DATA / "rfc6376.signed.rsa.msg").read_bytes()
    before = len(ns.queries)
    res, _ = run(tmp_path, data, ns.port, max_bytes=100)
    assert [(s.name, s.options) for s in res.symbols] == [
        ("DKIM_POLICY", ("d=football.example.com s=test a=rsa-sha256",))]
    assert "max_bytes" in res.data["signatures"][0]["reason"]
    assert len(ns.queries) == before  # no key looked up


def test_signatures_over_the_cap_are_not_verified(tmp_path, ns):
    res, _ = run(tmp_path, (DATA / "rfc6376.signed.msg").read_bytes(), ns.port, max_signatures=1)
    assert [r for _, _, r in results(res)] == ["pass", "policy"]


def test_garbage_signature_is_permerror(tmp_path, ns):
    data = b"DKIM-Signature: this is not a tag list\r\n" + crlf(
        (DATA / "test.message").read_bytes())
    res, _ = run(tmp_path, data, ns.port)
    assert names(res) == {"DKIM_PERMERROR"}


def test_unparsable_header_block_is_permerror(tmp_path, ns):
    data = signed(crlf((DATA / "test.message").read_bytes()), "test", "test.private")
    data = data.replace(b"\r\nSubject:", b"\r\nnot a header line\r\nSubject:", 1)
    res, _ = run(tmp_path, data, ns.port)
    assert names(res) == {"DKIM_PERMERROR"}
    assert "unparsable" in res.data["signatures"][0]["reason"]


def test_unsigned_oversized_message_is_none(tmp_path, ns):
    res, _ = run(tmp_path, (DATA / "test.message").read_bytes(), ns.port, max_bytes=10)
    assert names(res) == {"DKIM_NONE"}


# -- settings ------------------------------------------------------------------------------------
def test_from_config_reads_settings():
    f = DkimVerifyFilter.from_config({"max_bytes": 1000, "dns_timeout_s": 1.5}, Services())
    assert (f.max_bytes, f.dns_timeout_s, f.max_signatures) == (1000, 1.5, 10)


@pytest.mark.parametrize("cfg,key", [({"max_bytes": 0}, "max_bytes"),
                                     ({"dns_timeout_s": "x"}, "dns_timeout_s"),
                                     ({"strict": True}, "strict")])
def test_bad_settings_are_config_errors(cfg, key):
    with pytest.raises(ConfigError) as e:
        DkimVerifyFilter.from_config(cfg, Services())
    assert e.value.key == key


def test_linear_int_conversions_match_dkimpys_own() -> None:
    """filters/_dkimcrypto.py replaces dkimpy's quadratic int2str/str2int: same results."""
    import random

    import dkim.crypto

    from filters import _dkimcrypto

    orig_int2str, orig_str2int = _dkimcrypto.ORIGINAL
    assert dkim.crypto.int2str is _dkimcrypto.int2str
    assert dkim.crypto.str2int is _dkimcrypto.str2int
    rng = random.Random(6376)
    numbers = [0, 1, 255, 256, 65535, 65536, 2**2048 - 1, 2**4096 + 12345]
    numbers += [rng.getrandbits(rng.randrange(1, 4200)) for _ in range(300)]
    for n in numbers:
        for length in (-1, 0, 1, 2, 3, 128, 256, 257, 512):
            want = orig_int2str(n, length)  # a number too long for length: its low bytes
            got = _dkimcrypto.int2str(n, length)
            assert got == want and type(got) is type(want), (n, length)
        raw = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
        assert _dkimcrypto.str2int(raw) == orig_str2int(raw) == n
    assert _dkimcrypto.str2int(b"") == orig_str2int(b"") == 0
    assert _dkimcrypto.str2int(b"\x00\x00\x01") == orig_str2int(b"\x00\x00\x01") == 1
