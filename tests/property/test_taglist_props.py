"""DKIM-Signature and ARC tag lists: the project parses them with dkimpy's own
``dkim.util.parse_tag_value`` (and dkimpy's ARC instance reading), so the property is that our
filters' outcome matches dkimpy's on the same bytes. Messages signed by dkimpy (several
canonicalizations, l=, i=, header lists, rsa-sha1/-sha256) or sealed by our ``seal`` (one and two
ARC hops) are varied: folding white space inside b= (still valid), the tag list re-written
with other white space, order, extra or repeated tags, and random edits. The ``dkim`` filter
says ``pass`` exactly when dkimpy's ``verify`` does; the ``arc`` filter's chain status is
dkimpy's ``ARC.verify`` cv; a tag list dkimpy cannot parse is ``permerror``."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dkim
import pytest
from dkim.util import InvalidTagValueList, parse_tag_value
from hypothesis import event, given, settings
from hypothesis import strategies as st

from filters.arc import ArcFilter, Sealer, seal
from filters.dkim import DkimVerifyFilter
from gateway.dnsresolver import DnsAnswer
from gateway.filterapi import Client, FilterContext, Stage
from gateway.message import Message
from tests.property import PROPS, examples

DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")
DOMAIN, SELECTOR = b"football.example.com", b"test"
KEY_NAME = "test._domainkey.football.example.com"
BASE = (b"From: Joe <joe@football.example.com>\r\nTo: alice@example.test\r\n"
        b"Subject: tag lists\r\nDate: Tue, 8 Dec 2026 00:00:00 +0000\r\n"
        b"Message-ID: <p@football.example.com>\r\n\r\n"
        b"Hello  there,\r\n\r\nsome   body text\r\n\r\n\r\n")


def _key() -> tuple[bytes, bytes]:
    if not DATA.is_dir():
        return b"", b""
    return (DATA / "test.private").read_bytes(), (DATA / "test.txt").read_bytes().strip()


PRIVATE, RECORD = _key()


class FakeResolver:
    """Serves the one key record; every other name does not exist."""

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        if name.lower().rstrip(".") == KEY_NAME and rdtype == "TXT":
            rr: Any = SimpleNamespace(strings=(RECORD,))
            return DnsAnswer(name, rdtype, "ok", (rr,))
        return DnsAnswer(name, rdtype, "nxdomain")


def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
    key = name.decode() if isinstance(name, bytes) else name
    return RECORD if key.lower().rstrip(".") == KEY_NAME else None


def _signed() -> list[bytes]:
    if not PRIVATE:
        return []
    out = []
    for canon, length, identity, alg, headers in [
        ((b"relaxed", b"simple"), False, None, b"rsa-sha256", None),
        ((b"simple", b"simple"), False, None, b"rsa-sha256", None),
        ((b"relaxed", b"relaxed"), True, b"joe@football.example.com", b"rsa-sha256",
         [b"from", b"to", b"subject"]),
        ((b"simple", b"relaxed"), True, None, b"rsa-sha1", [b"from", b"from", b"subject"]),
    ]:
        sig = dkim.sign(BASE, SELECTOR, DOMAIN, PRIVATE, identity=identity, canonicalize=canon,
                        signature_algorithm=alg, include_headers=headers, length=length)
        out.append(sig + BASE)
    return out


def _sealed() -> list[bytes]:
    if not PRIVATE:
        return []
    sealer = Sealer(DOMAIN.decode(), SELECTOR.decode(), PRIVATE, None)
    one = b"Authentication-Results: hop1.example; spf=pass smtp.mailfrom=a@b.example\r\n" + BASE
    one = _fields(seal(one, sealer, "hop1.example", timestamp=1_700_000_000)) + one
    two = b"Authentication-Results: hop2.example; arc=pass (one hop)\r\n" + one
    two = _fields(seal(two, sealer, "hop2.example", timestamp=1_700_000_100)) + two
    return [one, two]


def _fields(fields: list[tuple[str, str]]) -> bytes:
    return b"".join(re.sub(r"\r?\n", "\r\n", f"{n}:{v}").encode() for n, v in fields)


SIGNED, SEALED = _signed(), _sealed()
SEP = st.sampled_from(["", " ", "\t", "\r\n\t", "\r\n ", "  "])


def _split(raw: bytes, names: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """(start, end) of the values (after the colon, CRLF included) of headers named ``names``."""
    spans = []
    for m in re.finditer(rb"^([A-Za-z-]+):(.*?\r\n)(?![ \t])", raw, re.M | re.S):
        if m.group(1).lower() in names:
            spans.append((m.start(2), m.end(2)))
    return spans


@st.composite
def varied(draw: Any, messages: list[bytes], names: tuple[bytes, ...]) -> bytes:
    raw = draw(st.sampled_from(messages))
    spans = _split(raw, names)
    start, end = draw(st.sampled_from(spans))
    value = raw[start:end - 2].decode()
    kind = draw(st.sampled_from(["as-is", "fold-b", "retag", "edit", "edit", "body"]))
    if kind == "retag" and value.lstrip().lower().startswith("i=") and "b=" not in value:
        kind = "edit"  # an ARC-Authentication-Results is no tag list
    if kind == "fold-b":  # FWS inside b=: the signature stays valid
        m = re.search(r"\bb=([^;]*)", value)
        if m:
            inner = re.sub(r"\s+", "", m.group(1))
            cut = sorted(draw(st.lists(st.integers(0, len(inner)), max_size=4)))
            pieces = [inner[i:j] for i, j in zip([0, *cut], [*cut, len(inner)], strict=True)]
            value = value[:m.start(1)] + draw(SEP) + "".join(
                p + draw(SEP) for p in pieces) + value[m.end(1):]
    elif kind == "retag":  # the same tags written otherwise (or with extras / repeats)
        tags = [(k, v) for k, v in (t.split("=", 1) for t in
                re.sub(r"\r\n[ \t]", " ", value).strip().rstrip(";").split(";"))]
        tags = [(k.strip(), v.strip()) for k, v in tags]
        extra = draw(st.sampled_from([[], [("x", "y")], [("D", "evil.example")],
                                      [(tags[0][0], tags[0][1])], [("d", "evil.example")],
                                      [("xi", "1")], [("xi", "60")], [("I", "60")]]))
        tags = tags + extra
        if draw(st.booleans()):
            tags = draw(st.permutations(tags))
        value = "".join(f"{draw(SEP)}{k}{draw(SEP)}={draw(SEP)}{v}{draw(SEP)};" for k, v in tags)
        if draw(st.booleans()):
            value = value.rstrip(";")
    elif kind == "edit":
        i = draw(st.integers(0, len(value)))
        j = draw(st.integers(i, min(len(value), i + 4)))
        value = value[:i] + draw(st.sampled_from(["", ";", "=", " ", "\r\n\t", "a", "0", "=;"]))\
            + value[j:]
    out = raw[:start] + value.encode() + b"\r\n" + raw[end:]
    if kind == "body":
        out += draw(st.sampled_from([b"x\r\n", b"\r\n", b" \r\n"]))
    return out


def _message(tmp: str, raw: bytes) -> Message:
    path = Path(tmp) / "msg"
    path.write_bytes(raw)
    return Message.from_spool(path, len(raw))


def _ctx(msg: Message) -> FilterContext:
    return FilterContext(stage=Stage.MESSAGE, qid="P", client=Client("192.0.2.1", 25, "x"),
                         message=msg)


@settings(PROPS, max_examples=examples(150))
@given(varied(SIGNED, (b"dkim-signature",)))
def test_dkim_filter_passes_exactly_when_dkimpy_does(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = asyncio.run(DkimVerifyFilter(FakeResolver()).on_message(_ctx(_message(tmp, raw))))
    sigs = res.data["signatures"]
    try:
        reference = dkim.DKIM(raw)
    except dkim.DKIMException:  # dkimpy cannot read the header block: nothing passes
        assert all(sig["result"] != "pass" for sig in sigs)
        return
    values = [v for n, v in reference.headers if n.lower() == b"dkim-signature"]
    assert len(sigs) == len(values)
    for idx, (sig, value) in enumerate(zip(sigs, values, strict=True)):
        try:
            ok = bool(dkim.DKIM(raw).verify(idx=idx, dnsfunc=lookup))
        except Exception:  # noqa: BLE001 - dkimpy's refusal, whatever its kind
            ok = False
        event(f"dkim {sig['result']}")
        assert (sig["result"] == "pass") == ok, (sig, raw)
        try:
            parse_tag_value(value)
        except InvalidTagValueList:
            assert sig["result"] == "permerror"


@settings(PROPS, max_examples=examples(100))
@given(varied(SEALED, (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")))
def test_arc_chain_status_is_dkimpys(raw: bytes) -> None:
    chain = asyncio.run(ArcFilter(FakeResolver()).validate(raw))  # type: ignore[arg-type]
    try:
        cv, _, _ = dkim.ARC(raw).verify(dnsfunc=lookup)
    except Exception:  # noqa: BLE001 - dkimpy's refusal: a failed chain
        cv = dkim.CV_Fail
    want = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    event(f"arc {want}")
    if chain.result == "policy":  # over our max_instances (RFC 8617's 50): not checked
        assert want != "pass" and dkim.ARC(raw).sorted_arc_headers()[0] > 50, (chain, raw)
        return
    assert chain.result == want, (chain, raw)


def test_unvaried_messages_pass() -> None:
    """The generators' starting points are valid: variation is what makes them fail."""
    for raw in SIGNED:
        with tempfile.TemporaryDirectory() as tmp:
            res = asyncio.run(DkimVerifyFilter(FakeResolver()).on_message(
                _ctx(_message(tmp, raw))))
        assert [s["result"] for s in res.data["signatures"]] == ["pass"]
    for raw in SEALED:
        assert asyncio.run(ArcFilter(FakeResolver()).validate(raw)).result == "pass"  # type: ignore[arg-type]
