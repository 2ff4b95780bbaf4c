"""The authres filter: the Authentication-Results header it builds (parsed back with the
``authres`` library) and the removal of forged headers carrying our authserv-id."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import authres
import authres.dmarc
import pytest

from filters.authres import AuthResultsFilter, authserv_id_of
from gateway.edits import build_headers
from gateway.filterapi import (
    Action,
    AddHeader,
    Client,
    ConfigError,
    FilterContext,
    RemoveHeader,
    Result,
    Stage,
)
from gateway.message import Message
from gateway.services import Services
from gateway.smtp.address import Address

PARSER = authres.FeatureContext(authres.dmarc)

SPF = Result(data={"result": "pass", "domain": "example.com", "identity": "mailfrom",
                   "mechanism": "ip4:192.0.2.1", "explanation": ""})
DKIM = Result(data={"signatures": [
    {"d": "example.com", "s": "sel1", "a": "rsa-sha256", "result": "pass", "reason": "",
     "aligned_domain": "example.com"},
    {"d": "other.example", "s": "ed", "a": "ed25519-sha256", "result": "fail",
     "reason": "body hash mismatch", "aligned_domain": "other.example"},
]})
DMARC = Result(data={"result": "pass", "domain": "example.com", "policy": "reject",
                     "spf_aligned": True, "dkim_aligned": True, "org_domain": "example.com",
                     "record": "domain", "applied": None, "reason": ""})


def message(tmp_path: Path, headers: str, body: str = "hello\r\n") -> Message:
    path = tmp_path / "msg"
    path.write_bytes((headers + "\r\n" + body).encode())
    return Message.from_spool(path, path.stat().st_size)


def ctx(msg: Message | None = None, results: dict[str, Result] | None = None,
        sender: Address | None = None) -> FilterContext:
    return FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 25, "mx.ex"),
                         sender=sender, message=msg,
                         results=results if results is not None else
                         {"spf": SPF, "dkim": DKIM, "dmarc": DMARC})


def run(f: AuthResultsFilter, c: FilterContext) -> Result:
    return asyncio.run(f.on_message(c))


def added(res: Result) -> Any:
    adds = [e for e in res.edits if isinstance(e, AddHeader)]
    assert len(adds) == 1 and adds[0].name == "Authentication-Results"
    return PARSER.parse_value(adds[0].value)


def removes(res: Result) -> list[RemoveHeader]:
    return [e for e in res.edits if isinstance(e, RemoveHeader)]


def test_header_lists_every_method_and_field(tmp_path: Path) -> None:
    f = AuthResultsFilter("mx.gateway.test")
    msg = message(tmp_path, "From: a@example.com\r\nSubject: x\r\n")
    h = added(run(f, ctx(msg, sender=Address("alice", "example.com"))))
    assert h.authserv_id == "mx.gateway.test"
    methods = [r.method for r in h.results]
    assert methods == ["spf", "dkim", "dkim", "dmarc"]
    spf, d1, d2, dmarc = h.results
    assert spf.result == "pass" and spf.smtp_mailfrom == "alice@example.com"
    assert spf.smtp_helo is None
    assert (d1.result, d1.header_d, d1.header_s, d1.header_a) == \
        ("pass", "example.com", "sel1", "rsa-sha256")
    assert (d2.result, d2.header_d, d2.header_s, d2.header_a) == \
        ("fail", "other.example", "ed", "ed25519-sha256")
    assert dmarc.result == "pass" and dmarc.header_from == "example.com"
    assert dmarc.policy == "reject"
    assert removes(run(f, ctx(msg))) == []


def test_helo_identity_and_no_signature() -> None:
    spf = Result(data={"result": "softfail", "domain": "mx.ex", "identity": "helo"})
    dkim = Result(data={"signatures": []})
    dmarc = Result(data={"result": "none", "domain": "example.com", "policy": "none",
                         "record": None})
    h = added(run(AuthResultsFilter("gw"), ctx(results={"spf": spf, "dkim": dkim,
                                                          "dmarc": dmarc})))
    spf_r, dkim_r, dmarc_r = h.results
    assert (spf_r.method, spf_r.result, spf_r.smtp_helo, spf_r.smtp_mailfrom) == \
        ("spf", "softfail", "mx.ex", None)
    assert (dkim_r.method, dkim_r.result, dkim_r.header_d) == ("dkim", "none", None)
    assert (dmarc_r.method, dmarc_r.result, dmarc_r.header_from) == \
        ("dmarc", "none", "example.com")
    assert dmarc_r.policy is None  # no record: no policy to report


def test_missing_results_are_left_out() -> None:
    h = added(run(AuthResultsFilter("gw"), ctx(results={"dkim": DKIM})))
    assert [r.method for r in h.results] == ["dkim", "dkim"]
    h = added(run(AuthResultsFilter("gw"), ctx(results={})))
    assert h.results == []


def test_methods_setting_limits_requires_and_header() -> None:
    f = AuthResultsFilter.from_config({"methods": ["spf", "dkim"]}, Services(hostname="h.test"))
    assert f.requires == ("spf", "dkim") and f.authserv_id == "h.test"
    assert [r.method for r in added(run(f, ctx())).results] == ["spf", "dkim", "dkim"]
    default = AuthResultsFilter.from_config({}, Services(hostname="h.test"))
    assert default.requires == () and default.after == ("spf", "dkim", "dmarc", "arc")
    assert default.methods == ("spf", "dkim", "dmarc", "arc")
    assert AuthResultsFilter.from_config({"authserv_id": "mx.x"}, Services()).authserv_id \
        == "mx.x"


@pytest.mark.parametrize("cfg", [{"methods": ["bimi"]}, {"authserv_id": "a b"},
                                 {"authserv_id": ""}, {"authserv_id": "a@b"},
                                 {"authserv_id": "a..b"}, {"bogus": 1}, {"methods": "spf"}])
def test_bad_settings(cfg: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        AuthResultsFilter.from_config(cfg, Services())


def test_forged_headers_removed_case_insensitively(tmp_path: Path) -> None:
    headers = ("Authentication-Results: mx.gateway.test; dkim=pass header.d=evil.example\r\n"
               "authentication-results: MX.Gateway.TEST;\r\n\tspf=pass smtp.mailfrom=x@evil\r\n"
               "Authentication-Results: (comment) mx.gateway.test 1; dmarc=pass\r\n"
               "Authentication-Results: mx.gateway.test.evil.example; dkim=pass\r\n"
               "Authentication-Results: other.example; dkim=fail\r\n"
               "X-Authentication-Results: mx.gateway.test; dkim=pass\r\n"
               "From: a@example.com\r\n")
    msg = message(tmp_path, headers)
    res = run(AuthResultsFilter("mx.gateway.test"), ctx(msg))
    assert len(removes(res)) == 3
    assert all(r.name == "Authentication-Results" for r in removes(res))
    out = build_headers(msg, [], res.edits, action=Action.ACCEPT, subject_tag="")
    text = out.decode()
    lines = [line for line in text.split("\r\n") if line and not line.startswith("\t")]
    ar = [line for line in lines if line.lower().startswith("authentication-results:")]
    assert len(ar) == 3
    assert ar[0].startswith("Authentication-Results: mx.gateway.test;")  # ours, first
    assert "spf=pass" in text and "smtp.mailfrom=x@evil" not in text
    assert "header.d=evil.example" not in text
    assert "mx.gateway.test.evil.example; dkim=pass" in text  # a different authserv-id
    assert "other.example; dkim=fail" in text
    assert "X-Authentication-Results: mx.gateway.test; dkim=pass" in text


@pytest.mark.parametrize(("value", "expected"), [
    ("mx.test; spf=pass", "mx.test"),
    ("  MX.test 1; none", "mx.test"),  # the library reads it lower case
    ("(c (nested)) mx.test; none", "mx.test"),
    ("(((((a) b) c) d) e) mx.test; dkim=pass", "mx.test"),  # issue 25's repro: was "e"
    ('mx.test; dkim=pass header.d="a;b" (c;d) ; spf=fail', "mx.test"),
    ("mx.test;\r\n\tnone", "mx.test"),
    ("mx.test;none", "mx.test"),
    ("mx.test 2; none", None),  # an unsupported version: unparsable
    ("mx.test", None),  # no result: unparsable
    ("", None),
])
def test_authserv_id_of(value: str, expected: str | None) -> None:
    assert authserv_id_of(value) == expected


FORGED = [  # every one names mx.gateway.test as its authserv-id, or cannot be parsed
    "(((((a) b) c) d) e) mx.gateway.test; dkim=pass header.d=bank.example",
    "((((((((a) b) c) d) e) f) g) h) MX.Gateway.Test; dkim=pass header.d=bank.example",
    "(a \\) b) (\\( c) mx.gateway.test (x (y)) 1 (v); dkim=pass header.d=bank.example",
    'mx.gateway.test; dkim=pass header.d="bank.example; spf=pass" (c;(d))',
    "mx.gateway.test 1 ; dkim=pass header.d=bank.example",
    "mx.gateway.test 2; dkim=pass header.d=bank.example",  # version the library refuses
    "mx.gateway.test. ; dkim=pass header.d=bank.example",  # trailing dot: unparsable
    "mx.gateway.test dkim=pass header.d=bank.example",  # no ';': unparsable
    "(" * 60 + ")" * 60 + " mx.gateway.test; dkim=pass header.d=bank.example",  # too deep
    "mx.gateway.test; dkim=pass header.d=bank.example" + " (x)" * 3000,  # too long
    "(mx.gateway.test) x y; dkim=pass header.d=bank.example",  # unparsable, named in a comment
    "(a) (b) mx.gateway.test; dkim=pass header.d=bank.example",  # the library's CFWS quirk
]
KEPT = [
    "other.example (mx.gateway.test); dkim=pass header.d=bank.example",  # parses as foreign
    "(mx.gateway.test) other.example; dkim=pass",
    "mx.gateway.test.evil.example; dkim=pass",
    "xmx.gateway.test; dkim=pass",
    "broken (value",  # unparsable, but does not name us
    "(a) (b) other.example; dkim=pass",  # unparsable by the library, does not name us
]


@pytest.mark.parametrize("value", FORGED)
def test_forged_variants_are_removed(tmp_path: Path, value: str) -> None:
    msg = message(tmp_path, f"Authentication-Results: {value}\r\nFrom: a@example.com\r\n")
    res = run(AuthResultsFilter("mx.gateway.test"), ctx(msg))
    assert removes(res) == [RemoveHeader("Authentication-Results", value_prefix=value)]
    out = build_headers(msg, [], res.edits, action=Action.ACCEPT, subject_tag="").decode()
    assert "bank.example" not in out


@pytest.mark.parametrize("value", KEPT)
def test_foreign_headers_are_kept(tmp_path: Path, value: str) -> None:
    msg = message(tmp_path, f"Authentication-Results: {value}\r\nFrom: a@example.com\r\n")
    res = run(AuthResultsFilter("mx.gateway.test"), ctx(msg))
    assert removes(res) == []


def test_parsing_is_bounded_per_message(tmp_path: Path) -> None:
    """Values naming us are parsed up to PARSE_BUDGET characters a message (the library is
    quadratic, the filter runs on the event loop); past it they are removed unparsed, while
    foreign headers stay whatever their number."""
    ours = "mx.gateway.test; dkim=pass header.d=bank.example" + " header.s=s" * 360  # ~3.6 KB
    foreign = "other.example (mx.gateway.test); dkim=pass" + " header.s=s" * 360
    headers = "".join(f"Authentication-Results: {v} header.i=n{i}\r\n"
                      for i in range(8) for v in (foreign, ours))
    msg = message(tmp_path, headers + "From: a@example.com\r\n")
    f = AuthResultsFilter("mx.gateway.test")
    start = time.process_time()
    res = run(f, ctx(msg))
    spent = time.process_time() - start
    gone = {r.value_prefix for r in removes(res)}
    assert all(v.startswith("mx.gateway.test;") or v.startswith("other.example") for v in gone)
    assert sum(v.startswith("mx.gateway.test;") for v in gone) == 8  # every one of ours
    # the foreign ones parsed within the budget stay; later ones go unparsed (fail closed)
    kept = [v for v in msg.get_all("Authentication-Results") if v not in gone]
    assert len(kept) == 2 and all(v.startswith("other.example") for v in kept)
    assert spent < 2.0, spent


def test_encoded_words_are_read_as_a_decoding_reader_shows_them(tmp_path: Path) -> None:
    kept = "other.example; dkim=pass (=?utf-8?q?caf=C3=A9?=) header.d=a.example"
    long_one = "other.example; dkim=pass (" + "=?utf-8?q?x?= " * 400 + ")"
    forged = "=?utf-8?b?bXguZ2F0ZXdheS50ZXN0OyBka2ltPXBhc3M=?="  # "mx.gateway.test; dkim=pass"
    msg = message(tmp_path, f"Authentication-Results: {kept}\r\n"
                            f"Authentication-Results: {long_one}\r\n"
                            f"Authentication-Results: {forged}\r\nFrom: a@example.com\r\n")
    res = run(AuthResultsFilter("mx.gateway.test"), ctx(msg))
    # the forged one (old code: kept); one too long to decode is removed (fail closed)
    assert [r.value_prefix for r in removes(res)] == [" ".join(long_one.split()), forged]
