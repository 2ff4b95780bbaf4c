"""filters/_arheader.py: Authentication-Results and ARC-Authentication-Results read by the
``authres`` library's grammar (comments, nesting, quoting, folding, versions), the text of each
result clause kept as written, the fail-closed limits, and the arc filter's uses of it
(``consolidate`` for sealing, ``aar_result`` for the DMARC trusted-sealer override)."""

from __future__ import annotations

import authres
import dkim
import pytest

from filters import _arheader
from filters.arc import aar_result, consolidate
from gateway import patches
from tests.support.patches import kept_patch_status, patch_warnings


def test_parse_keeps_each_result_clause_as_written() -> None:
    p = _arheader.parse('(c) MX.Test (v) 1 (w);\r\n dkim=pass (good (very)) header.d=a.example'
                        ' ;spf=fail smtp.mailfrom="x;y"@b.example (c;d) ; dmarc=none')
    assert p is not None
    assert (p.authserv_id, p.version, p.instance) == ("mx.test", "1", None)
    assert [r.method for r in p.results] == ["dkim", "spf", "dmarc"]
    assert p.texts == ("dkim=pass (good (very)) header.d=a.example",
                       'spf=fail smtp.mailfrom="x;y"@b.example (c;d)', "dmarc=none")


def test_parse_none_has_no_results() -> None:
    p = _arheader.parse("mx.test; none")
    assert p is not None and p.results == () and p.texts == ()


@pytest.mark.parametrize("value", [
    "mx.test", "mx.test 2; none", "mx.test.; none", "(mx.test; none", "mx.test; dkim",
    "i=1; mx.test; none",  # an AAR is not an A-R
    "(" * 51 + ")" * 51 + " mx.test; none",  # deeper than MAX_NESTING
    "mx.test; dkim=pass" + " (x)" * 3000,  # longer than MAX_VALUE
    "(" * 2000 + ")" * 2000 + " mx.test; none",  # the library would hit RecursionError
])
def test_unparsable(value: str) -> None:
    assert _arheader.parse(value) is None


def test_limits_are_where_the_library_still_answers() -> None:
    deep = "(" * _arheader.MAX_NESTING + ")" * _arheader.MAX_NESTING + " mx.test; none"
    p = _arheader.parse(deep)
    assert p is not None and p.authserv_id == "mx.test"


@pytest.mark.parametrize(("value", "instance", "authserv"), [
    ("i=1; mx.test; dmarc=pass", 1, "mx.test"),
    ("(c) I = 12 (d) ; (e) Mx.Test 1; dmarc=pass", 12, "mx.test"),
    ("i=3;\r\n\tmx.test;\r\n\tdmarc=pass", 3, "mx.test"),
])
def test_parse_aar(value: str, instance: int, authserv: str) -> None:
    p = _arheader.parse_aar(value)
    assert p is not None and (p.instance, p.authserv_id) == (instance, authserv)
    assert [(r.method, r.result) for r in p.results] == [("dmarc", "pass")]


@pytest.mark.parametrize("value", ["mx.test; dmarc=pass", "i=; mx.test; none", "i=1 mx.test; none",
                                   "x=1; mx.test; none", "i=123456; mx.test; none"])
def test_parse_aar_refuses(value: str) -> None:
    assert _arheader.parse_aar(value) is None


@pytest.mark.parametrize(("aar", "expected"), [
    ("i=1; sealer.example; dmarc=pass header.from=a.example", "pass"),
    ("i=1; sealer.example; (((((a) b) c) d) e) dmarc=pass", "pass"),
    ("i=1; sealer.example; spf=pass; dmarc=fail", "fail"),
    # old hand-written reading: the first clause was lost in its comment, the second said pass
    ("i=1; sealer.example; (((((a) b) c) d) e) dmarc=fail; dmarc=pass", None),
    ('i=1; sealer.example; dkim=pass header.b="; dmarc=pass"', None),
    ("i=1; sealer.example; dkim=pass (; dmarc=pass)", None),
    ("sealer.example; dmarc=pass", None),  # no i=: not an AAR
    ("i=1; sealer.example dmarc=pass", None),  # unparsable
])
def test_aar_result(aar: str, expected: str | None) -> None:
    assert aar_result(aar, "dmarc") == expected


def _h(value: str) -> tuple[bytes, bytes]:
    return b"Authentication-Results", f" {value}\r\n".encode()


def test_consolidate_reads_headers_like_the_library() -> None:
    headers = [
        _h("(((((a) b) c) d) e) mx.gateway.test; dkim=pass (good) header.d=a.example"),
        _h("other.example (mx.gateway.test); arc=fail"),
        _h("mx.gateway.test 2; arc=fail"),  # unparsable: left out, as dkimpy does
        _h("MX.gateway.test;\r\n\tarc=pass (chain of 2)"),
        (b"X-Other", b" mx.gateway.test; arc=fail\r\n"),
    ]
    results, cv = consolidate(headers, "mx.gateway.test")
    assert results == ["dkim=pass (good) header.d=a.example", "arc=pass (chain of 2)"]
    assert cv == dkim.CV_Pass
    assert consolidate(headers[:1], "mx.gateway.test")[1] == dkim.CV_None
    two = headers + [_h("mx.gateway.test; arc=pass")]
    assert consolidate(two, "mx.gateway.test")[1] == dkim.CV_Fail


def test_consolidate_matches_dkimpy_on_plain_headers() -> None:
    """Without comments, the results are the library's own rendering, as dkimpy's sign has."""
    values = ["mx.gateway.test; spf=pass smtp.mailfrom=a@b.example",
              "mx.gateway.test; dkim=fail header.d=b.example; arc=none"]
    results, cv = consolidate([_h(v) for v in values], "mx.gateway.test")
    parsed = [authres.AuthenticationResultsHeader.parse_value(v) for v in values]
    assert results == [str(r) for h in parsed for r in h.results]
    assert cv == dkim.CV_None


@pytest.mark.parametrize(("value", "mentioned"), [
    ("mx.test; none", True), ("(MX.TEST) x; none", True), ('x; a=b c.d="mx.test"', True),
    ("mx.test.; none", True), ("evil.mx.test; none", True),
    ("mx.test.evil; none", False), ("xmx.test; none", False), ("mx.test-x; none", False),
    ("mx.tester; none", False), ("mx_test; none", False),
])
def test_mentions(value: str, mentioned: bool) -> None:
    assert _arheader.mentions(value, "mx.test") is mentioned


_BREAKS = [
    ("_parse_resinfo", None, "AuthenticationResultsHeader._parse_resinfo is missing"),
    ("_parse", lambda self: None, "AuthenticationResultsHeader._parse no longer calls"),
    ("_parse_rfc5322_cfws", lambda self: False, "known"),  # another answer: i=2 ; unread
]


@pytest.mark.parametrize(("name", "replacement", "reason"), _BREAKS)
def test_a_changed_library_turns_the_clause_spans_off(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        name: str, replacement: object, reason: str) -> None:
    lib = authres.core.AuthenticationResultsHeader
    value = "mx.test; dkim=pass (good) header.d=a.example"
    assert _arheader.parse(value).texts == ("dkim=pass (good) header.d=a.example",)  # type: ignore[union-attr]
    with kept_patch_status():
        if replacement is None:
            monkeypatch.delattr(lib, name)
        else:
            monkeypatch.setattr(lib, name, replacement)
        patches.forget(_arheader.PATCH)
        assert not patches.install(_arheader.PATCH, _arheader.check)
        [line] = patch_warnings(caplog)
        assert line.startswith(f"patch {_arheader.PATCH} disabled") and reason in line
        monkeypatch.undo()  # the library's own path, with the patch off
        p = _arheader.parse(value)
        assert p is not None and p.texts == ("dkim=pass header.d=a.example",)  # as it renders
        assert [r.method for r in p.results] == ["dkim"]
        assert _arheader.parse_aar(f"i=1; {value}") is None
    assert _arheader.parse_aar(f"i=1; {value}") is not None
