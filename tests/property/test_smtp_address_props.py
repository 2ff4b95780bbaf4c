"""The SMTP envelope parser (gateway/smtp/address.py): every MAIL/RCPT argument gives either a
parsed address or an AddressError carrying a proper reply (a 5xx code with a matching RFC 3463
enhanced status code); nothing else escapes. A parsed ASCII path is one the RFC 5321 grammar
(a plain regular-expression reference below) accepts, its parts are the grammar's parts, and
writing it back (``Address.addr``) parses to the same address. A path the reference accepts
is parsed unless it falls under one of the module's documented refusals."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from gateway.smtp.address import (
    MAX_LOCAL_PART,
    MAX_PATH,
    AddressError,
    PathArg,
    parse_mail_from,
    parse_rcpt_to,
)
from tests.property import PROPS

# RFC 5321 4.1.2 / 4.1.3, ASCII only (the reference)
ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
DOT_STRING = rf"{ATEXT}+(?:\.{ATEXT}+)*"
QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
DOMAIN = rf"{SUB_DOMAIN}(?:\.{SUB_DOMAIN})*"
SNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{SNUM}(?:\.{SNUM}){{3}}"
IPV6 = r"IPv6:[0-9A-Fa-f:.]+"  # the hex/colon shape; ipaddress checks the rest
GENERAL = r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+"
LITERAL = rf"\[(?:{IPV4}|{IPV6}|{GENERAL})\]"
MAILBOX = rf"(?P<local>{DOT_STRING}|{QUOTED})@(?P<domain>{DOMAIN}|{LITERAL})"
ADL = rf"@{DOMAIN}(?:,@{DOMAIN})*"
PATH = re.compile(rf"<(?:(?P<adl>{ADL}):)?{MAILBOX}>", re.IGNORECASE)
ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")

atext = st.sampled_from(list("abcXYZ019!#$%&'*+-/=?^_`{|}~"))
atom = st.text(alphabet=atext, min_size=1, max_size=6)
qchar = st.sampled_from(list(' !#a@Z[]\\"(),:;<>.') + ["\\\\", '\\"', "\\ ", "\\a"])
label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,6}[A-Za-z0-9])?", fullmatch=True)
domain = st.one_of(st.lists(label, min_size=1, max_size=4).map(".".join), st.sampled_from([
    "[192.0.2.1]", "[IPv6:2001:db8::1]", "[IPv6:::1]", "[192.0.02.1]", "[x-tag:abc]",
    "[256.1.1.1]", "[IPv6:1:2:3:4:5:6:7::]", "exa_mple.test", "example.test.", "-a.test",
    "b\u00fccher.example", "a..b", "[1.2.3.4", "\u0430pple.test"]))
local = st.one_of(st.lists(atom, min_size=1, max_size=3).map(".".join),
                  st.lists(qchar, max_size=8).map(lambda cs: '"' + "".join(cs) + '"'),
                  st.sampled_from(["a..b", ".a", "a.", "j\u00f6rg", "Postmaster", "a b",
                                   "a\x00b", "a\ud800b", "x" * 65]))
junk = st.sampled_from(["", " ", "<", ">", "@", ":", ",", '"', "\\", "\t", "\r", "\x00",
                        "\u00a0", "\u2028", "=", "[", "]"])


@st.composite
def paths(draw: Any) -> str:
    route = draw(st.sampled_from(["", "", "@relay.test:", "@a.test,@b.test:", "@:", "@a.test"]))
    inner = f"{route}{draw(local)}@{draw(domain)}"
    inner = draw(st.sampled_from([inner] * 6 + ["", "postmaster", "POSTMASTER", "user"]))
    path = f"<{inner}>"
    if draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, len(path)))
        path = path[:i] + draw(junk) + path[i:]
    return path


params = st.lists(st.sampled_from([
    "SIZE=100", "BODY=8BITMIME", "SMTPUTF8", "SMTPUTF8=yes", "RET=HDRS", "ENVID=a+2Bb",
    "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@b.test", "X=", "=y", "SIZE=1 SIZE=2",
    "K=v\u00e9", "K=\u00a0", "-X=1", "X_Y=1"]), max_size=2).map(" ".join)


@st.composite
def arguments(draw: Any, keyword: str) -> str:
    head = draw(st.sampled_from([keyword] * 4 + [keyword.lower(), f" {keyword} ", keyword[:-1],
                                                 "", keyword.replace(":", " :")]))
    tail = draw(params)
    return f"{head}{draw(paths())}{' ' + tail if tail else ''}"


def check_error(e: AddressError) -> None:
    reply = e.reply
    assert 500 <= reply.code <= 599, reply
    m = ENHANCED.fullmatch(reply.status)
    assert m and m.group(1) == str(reply.code)[0], reply
    assert reply.text and "\r" not in reply.text and "\n" not in reply.text


def parse(verb: str, arg: str, utf8: bool) -> PathArg | AddressError:
    try:
        if verb == "MAIL":
            return parse_mail_from(arg, smtputf8_enabled=utf8)
        return parse_rcpt_to(arg, smtputf8_ok=utf8)
    except AddressError as e:
        return e


def check_parsed(verb: str, arg: str, got: PathArg, utf8: bool) -> None:
    a = got.address
    assert a.domain_key is not None and isinstance(a.routing_tricks, tuple)
    path = arg.lstrip(" ")[len("FROM:" if verb == "MAIL" else "TO:"):].lstrip(" ")
    path = path[:path.index(">") + 1] if not a.quoted else path
    if a.is_null or (not a.domain and a.local.lower() == "postmaster"):
        return
    # written back, it parses to the same address
    again = parse(verb, f"{'FROM' if verb == 'MAIL' else 'TO'}:<{a.addr}>", True)
    assert isinstance(again, PathArg), (a, again)
    assert (again.address.local, again.address.domain) == (a.local, a.domain)
    if not arg.isascii():
        return
    m = PATH.match(arg.lstrip(" ")[len("FROM:" if verb == "MAIL" else "TO:"):].lstrip(" "))
    assert m, (arg, a)  # the reference grammar accepts what we parsed
    assert m.group("domain") == a.domain
    want_local = m.group("local")
    if want_local.startswith('"'):
        want_local = re.sub(r"\\(.)", r"\1", want_local[1:-1])
    assert want_local == a.local
    assert len(m.group(0).encode()) <= MAX_PATH and len(a.local.encode()) <= MAX_LOCAL_PART \
        or a.quoted


@PROPS
@given(st.sampled_from(["MAIL", "RCPT"]), st.booleans(), st.data())
def test_every_argument_parses_or_gets_a_proper_reply(verb: str, utf8: bool, data: Any) -> None:
    keyword = "FROM:" if verb == "MAIL" else "TO:"
    arg = data.draw(st.one_of(arguments(keyword), arguments(keyword), st.text(max_size=80)))
    got = parse(verb, arg, utf8)
    if isinstance(got, AddressError):
        event(f"{got.reply.code} {got.reply.status}")
        check_error(got)
    else:
        event("parsed")
        check_parsed(verb, arg, got, utf8)


@PROPS
@given(st.from_regex(PATH, fullmatch=True))
def test_reference_paths_are_parsed_unless_documented_refusals(path: str) -> None:
    m = PATH.fullmatch(path)
    assert m
    got = parse("RCPT", f"TO:{path}", False)
    local, dom = m.group("local"), m.group("domain")
    refusal = (local == '""' or dom.startswith("[") and not _plain_literal(dom)
               or len(path.encode()) > MAX_PATH
               or len(re.sub(r"\\(.)", r"\1", local).encode()) > MAX_LOCAL_PART
               or any(len(lb) > 63 for lb in re.split(r"[.,:@]", m.group(0)))
               or len(dom) > 255)
    if isinstance(got, AddressError):
        check_error(got)
        assert refusal, (path, got.detail)
    else:
        assert (got.address.domain, bool(got.address.source_route)) == \
            (dom, bool(m.group("adl")))


def _plain_literal(dom: str) -> bool:
    body = dom[1:-1]
    if re.fullmatch(IPV4, body):
        return True
    if body[:5].lower() == "ipv6:":
        import ipaddress
        try:
            ipaddress.IPv6Address(body[5:])
        except ValueError:
            return False
        head, _, tail = body[5:].partition("::")
        pieces = [p for p in head.split(":") + tail.split(":") if p]
        return "::" not in body[5:] or len(pieces) + (1 if pieces and "." in pieces[-1]
                                                      else 0) <= 6
    return False
