"""Tests for gateway.smtp.address: MAIL FROM / RCPT TO argument parsing and xtext."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable

import pytest

from gateway.errors import MailgateError
from gateway.smtp.address import (
    NULL,
    Address,
    AddressError,
    PathArg,
    parse_mail_from,
    parse_rcpt_to,
    xtext_decode,
    xtext_encode,
)


def mail(arg: str, *, enabled: bool = True) -> PathArg:
    return parse_mail_from(arg, smtputf8_enabled=enabled)


def rcpt(arg: str, *, utf8: bool = False) -> PathArg:
    return parse_rcpt_to(arg, smtputf8_ok=utf8)


def rejected(parse: Callable[[], object]) -> AddressError:
    with pytest.raises(AddressError) as info:
        parse()
    return info.value


def assert_reply(err: AddressError, code: int, status: str, fragment: str) -> None:
    assert (err.reply.code, err.reply.status) == (code, status), err.detail
    assert fragment in err.detail, err.detail


# --- good paths ------------------------------------------------------------------------------

# (MAIL argument, expected Address, addr, domain_key, routing_tricks)
GOOD_MAIL: list[tuple[str, Address, str, str, tuple[str, ...]]] = [
    (
        "FROM:<user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "from:<user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "FrOm:<user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "FROM: <user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "FROM:  <user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        " FROM:<user@example.test>",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "FROM:<user@example.test> ",
        Address("user", "example.test"),
        "user@example.test",
        "example.test",
        (),
    ),
    (
        "FROM:<User.Name@Example.TEST>",
        Address("User.Name", "Example.TEST"),
        "User.Name@Example.TEST",
        "example.test",
        (),
    ),
    (
        "FROM:<first.middle.last@sub.example.test>",
        Address("first.middle.last", "sub.example.test"),
        "first.middle.last@sub.example.test",
        "sub.example.test",
        (),
    ),
    # RFC 3696 section 3 examples that are valid unquoted.
    (
        "FROM:<customer/department=shipping@example.com>",
        Address("customer/department=shipping", "example.com"),
        "customer/department=shipping@example.com",
        "example.com",
        (),
    ),
    (
        "FROM:<$A12345@example.com>",
        Address("$A12345", "example.com"),
        "$A12345@example.com",
        "example.com",
        (),
    ),
    (
        "FROM:<_somename@example.com>",
        Address("_somename", "example.com"),
        "_somename@example.com",
        "example.com",
        (),
    ),
    (
        "FROM:<!def!xyz%abc@example.com>",
        Address("!def!xyz%abc", "example.com"),
        "!def!xyz%abc@example.com",
        "example.com",
        ("percent-hack", "bang-path"),
    ),
    (
        "FROM:<a.{b}|c~d'e*f+g=h?i^j`k#l&m@example.test>",
        Address("a.{b}|c~d'e*f+g=h?i^j`k#l&m", "example.test"),
        "a.{b}|c~d'e*f+g=h?i^j`k#l&m@example.test",
        "example.test",
        (),
    ),
    # Domains: digits, hyphens inside, single label, xn-- labels written as A-labels.
    (
        "FROM:<u@123.example.test>",
        Address("u", "123.example.test"),
        "u@123.example.test",
        "123.example.test",
        (),
    ),
    ("FROM:<u@a-b--c.test>", Address("u", "a-b--c.test"), "u@a-b--c.test", "a-b--c.test", ()),
    ("FROM:<u@localhost>", Address("u", "localhost"), "u@localhost", "localhost", ()),
    (
        "FROM:<u@XN--BCHER-KVA.example>",
        Address("u", "XN--BCHER-KVA.example"),
        "u@XN--BCHER-KVA.example",
        "xn--bcher-kva.example",
        (),
    ),
    # Quoted-string local parts: unquoted in `local`, re-quoted in `addr` only when needed.
    (
        'FROM:<"john"@example.test>',
        Address("john", "example.test", quoted=True),
        "john@example.test",
        "example.test",
        (),
    ),
    (
        'FROM:<"Fred Bloggs"@example.com>',
        Address("Fred Bloggs", "example.com", quoted=True),
        '"Fred Bloggs"@example.com',
        "example.com",
        (),
    ),
    (
        'FROM:<"Joe\\\\Blow"@example.com>',
        Address("Joe\\Blow", "example.com", quoted=True),
        '"Joe\\\\Blow"@example.com',
        "example.com",
        (),
    ),
    (
        'FROM:<"a\\"b"@example.test>',
        Address('a"b', "example.test", quoted=True),
        '"a\\"b"@example.test',
        "example.test",
        (),
    ),
    (
        'FROM:<"\\j\\o\\e"@example.test>',
        Address("joe", "example.test", quoted=True),
        "joe@example.test",
        "example.test",
        (),
    ),
    (
        'FROM:<"a..b"@example.test>',
        Address("a..b", "example.test", quoted=True),
        '"a..b"@example.test',
        "example.test",
        (),
    ),
    (
        'FROM:<".a"@example.test>',
        Address(".a", "example.test", quoted=True),
        '".a"@example.test',
        "example.test",
        (),
    ),
    (
        'FROM:<"a>b"@example.test>',
        Address("a>b", "example.test", quoted=True),
        '"a>b"@example.test',
        "example.test",
        (),
    ),
    (
        'FROM:<"()<>[]:,;\\\\\\"! #$%&\'*+-/=?^_`{}| ~.a"@example.test>',
        Address("()<>[]:,;\\\"! #$%&'*+-/=?^_`{}| ~.a", "example.test", quoted=True),
        '"()<>[]:,;\\\\\\"! #$%&\'*+-/=?^_`{}| ~.a"@example.test',
        "example.test",
        ("percent-hack", "bang-path"),
    ),
    # Every routing trick on its own ...
    (
        "FROM:<user%other.test@example.test>",
        Address("user%other.test", "example.test"),
        "user%other.test@example.test",
        "example.test",
        ("percent-hack",),
    ),
    (
        "FROM:<other.test!user@example.test>",
        Address("other.test!user", "example.test"),
        "other.test!user@example.test",
        "example.test",
        ("bang-path",),
    ),
    (
        'FROM:<"user@other.test"@example.test>',
        Address("user@other.test", "example.test", quoted=True),
        '"user@other.test"@example.test',
        "example.test",
        ("quoted-at",),
    ),
    (
        "FROM:<@relay.test:user@other.test>",
        Address("user", "other.test", source_route=("relay.test",)),
        "user@other.test",
        "other.test",
        ("source-route",),
    ),
    (
        "FROM:<@a.test,@b.test:user@c.test>",
        Address("user", "c.test", source_route=("a.test", "b.test")),
        "user@c.test",
        "c.test",
        ("source-route",),
    ),
    (
        "FROM:<user@[192.0.2.1]>",
        Address("user", "[192.0.2.1]", literal=True),
        "user@[192.0.2.1]",
        "[192.0.2.1]",
        ("address-literal",),
    ),
    (
        "FROM:<user@[IPv6:2001:db8::1]>",
        Address("user", "[IPv6:2001:db8::1]", literal=True),
        "user@[IPv6:2001:db8::1]",
        "[ipv6:2001:db8::1]",
        ("address-literal",),
    ),
    # ... and all at once, in the documented order.
    (
        'FROM:<@relay.test:"a%b!c@d"@[192.0.2.1]>',
        Address("a%b!c@d", "[192.0.2.1]", ("relay.test",), quoted=True, literal=True),
        '"a%b!c@d"@[192.0.2.1]',
        "[192.0.2.1]",
        ("source-route", "percent-hack", "bang-path", "quoted-at", "address-literal"),
    ),
    # '@' in an unquoted local part can only come from a quoted string: not a trick otherwise.
    (
        'FROM:<"a b"@example.test>',
        Address("a b", "example.test", quoted=True),
        '"a b"@example.test',
        "example.test",
        (),
    ),
    # Address literals: IPv4 edge values, IPv6 forms (RFC 5321 4.1.3), tag case-insensitive.
    (
        "FROM:<u@[0.0.0.0]>",
        Address("u", "[0.0.0.0]", literal=True),
        "u@[0.0.0.0]",
        "[0.0.0.0]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[255.255.255.255]>",
        Address("u", "[255.255.255.255]", literal=True),
        "u@[255.255.255.255]",
        "[255.255.255.255]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[IPv6:2001:DB8:0:0:0:0:0:1]>",
        Address("u", "[IPv6:2001:DB8:0:0:0:0:0:1]", literal=True),
        "u@[IPv6:2001:DB8:0:0:0:0:0:1]",
        "[ipv6:2001:db8::1]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[ipv6:::1]>",
        Address("u", "[ipv6:::1]", literal=True),
        "u@[ipv6:::1]",
        "[ipv6:::1]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[IPv6:1:2:3:4:5:6::]>",
        Address("u", "[IPv6:1:2:3:4:5:6::]", literal=True),
        "u@[IPv6:1:2:3:4:5:6::]",
        "[ipv6:1:2:3:4:5:6::]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[IPv6:::ffff:192.0.2.1]>",
        Address("u", "[IPv6:::ffff:192.0.2.1]", literal=True),
        "u@[IPv6:::ffff:192.0.2.1]",
        "[ipv6:::ffff:c000:201]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[IPv6:1:2:3:4::192.0.2.1]>",
        Address("u", "[IPv6:1:2:3:4::192.0.2.1]", literal=True),
        "u@[IPv6:1:2:3:4::192.0.2.1]",
        "[ipv6:1:2:3:4::c000:201]",
        ("address-literal",),
    ),
    (
        "FROM:<u@[IPv6:1:2:3:4:5:6:192.0.2.1]>",
        Address("u", "[IPv6:1:2:3:4:5:6:192.0.2.1]", literal=True),
        "u@[IPv6:1:2:3:4:5:6:192.0.2.1]",
        "[ipv6:1:2:3:4:5:6:c000:201]",
        ("address-literal",),
    ),
]


@pytest.mark.parametrize(("arg", "address", "addr", "key", "tricks"), GOOD_MAIL)
def test_mail_from_good(
    arg: str, address: Address, addr: str, key: str, tricks: tuple[str, ...]
) -> None:
    parsed = mail(arg)
    assert parsed.address == address
    assert parsed.address.addr == addr
    assert parsed.address.domain_key == key
    assert parsed.address.routing_tricks == tricks
    assert parsed.address.is_null is False
    assert parsed.params == ()


@pytest.mark.parametrize(("arg", "address", "addr", "key", "tricks"), GOOD_MAIL)
def test_rcpt_to_accepts_the_same_paths(
    arg: str, address: Address, addr: str, key: str, tricks: tuple[str, ...]
) -> None:
    head, colon, rest = arg.lstrip(" ").partition(":")
    assert head.upper() == "FROM" and colon
    parsed = rcpt("TO:" + rest)
    assert parsed.address == address
    assert parsed.address.addr == addr
    assert parsed.address.domain_key == key
    assert parsed.address.routing_tricks == tricks


@pytest.mark.parametrize(("arg", "address", "addr", "key", "tricks"), GOOD_MAIL)
def test_addr_is_a_path_that_parses_back(
    arg: str, address: Address, addr: str, key: str, tricks: tuple[str, ...]
) -> None:
    again = mail(f"FROM:<{addr}>").address
    assert (again.local, again.domain, again.literal) == (
        address.local,
        address.domain,
        address.literal,
    )
    assert again.addr == addr


@pytest.mark.parametrize("arg", ["FROM:<>", "from:<>", "FROM: <>", "FROM:<> "])
def test_null_reverse_path(arg: str) -> None:
    parsed = mail(arg)
    assert parsed.address == NULL
    assert parsed.address.is_null
    assert parsed.address.addr == ""
    assert parsed.address.domain_key == ""
    assert parsed.address.routing_tricks == ()
    assert parsed.params == ()


def test_null_reverse_path_with_parameters() -> None:
    parsed = mail("FROM:<> SIZE=100 BODY=8BITMIME")
    assert parsed.address.is_null
    assert parsed.params == (("SIZE", "100"), ("BODY", "8BITMIME"))


@pytest.mark.parametrize("written", ["Postmaster", "postmaster", "POSTMASTER", "PostMaster"])
def test_rcpt_bare_postmaster(written: str) -> None:
    parsed = rcpt(f"TO:<{written}> NOTIFY=NEVER")
    assert parsed.address == Address(written, "")
    assert parsed.address.is_null is False
    assert parsed.address.domain == ""
    assert parsed.address.domain_key == ""
    assert parsed.address.addr == written
    assert parsed.params == (("NOTIFY", "NEVER"),)


def test_rcpt_postmaster_with_domain_is_an_ordinary_address() -> None:
    assert rcpt("TO:<postmaster@example.test>").address == Address("postmaster", "example.test")


def test_literal_ip_property() -> None:
    assert mail("FROM:<u@[192.0.2.1]>").address.ip == ipaddress.IPv4Address("192.0.2.1")
    assert mail("FROM:<u@[IPv6:2001:db8::1]>").address.ip == ipaddress.IPv6Address("2001:db8::1")
    assert mail("FROM:<u@example.test>").address.ip is None
    assert NULL.ip is None


# --- bad paths -------------------------------------------------------------------------------

# (MAIL argument, code, enhanced status, fragment of the detail naming the reason)
BAD_MAIL: list[tuple[str, int, str, str]] = [
    # the keyword
    ("", 501, "5.5.4", "FROM:"),
    ("FROM", 501, "5.5.4", "FROM:"),
    ("FROM <user@example.test>", 501, "5.5.4", "FROM:"),
    ("FROM :<user@example.test>", 501, "5.5.4", "FROM:"),
    ("TO:<user@example.test>", 501, "5.5.4", "FROM:"),
    ("FRO\rM:<user@example.test>", 501, "5.5.4", "FROM:"),
    ("<user@example.test>", 501, "5.5.4", "FROM:"),
    # angle brackets and the structure around the path
    ("FROM:", 501, "5.1.7", "angle brackets"),
    ("FROM:user@example.test", 501, "5.1.7", "angle brackets"),
    ("FROM: user@example.test", 501, "5.1.7", "angle brackets"),
    ("FROM:\t<user@example.test>", 501, "5.1.7", "angle brackets"),
    ("FROM:<user@example.test", 501, "5.1.7", "missing closing"),
    ("FROM:<", 501, "5.1.7", "missing closing"),
    ("FROM:<user@example.test>garbage", 501, "5.1.7", "garbage after path"),
    ("FROM:<user@example.test>SIZE=1", 501, "5.1.7", "garbage after path"),
    ("FROM:<user@example.test>>", 501, "5.1.7", "garbage after path"),
    ("FROM:<<user@example.test>>", 501, "5.1.7", "garbage after path"),
    ("FROM:<<user@example.test>", 501, "5.1.7", "'<' not allowed in unquoted local part"),
    ('FROM:<"user@example.test>', 501, "5.1.7", "unbalanced quote"),
    ('FROM:<"user\\"@example.test>', 501, "5.1.7", "unbalanced quote"),
    ("FROM:<user@[192.0.2.1>", 501, "5.1.7", "unbalanced bracket"),
    ("FROM:<user@192.0.2.1]>", 501, "5.1.7", "not allowed in domain"),
    # missing pieces
    ("FROM:<user>", 501, "5.1.7", "missing '@'"),
    ("FROM:<Postmaster>", 501, "5.1.7", "missing '@'"),
    ("FROM:<@example.test>", 501, "5.1.7", "source route without ':'"),
    ("FROM:<user@>", 501, "5.1.7", "missing domain"),
    ('FROM:<""@example.test>', 501, "5.1.7", "empty local part"),
    ('FROM:<"user"example.test>', 501, "5.1.7", "missing '@' after quoted"),
    ('FROM:<"us"er@example.test>', 501, "5.1.7", "missing '@' after quoted"),
    # Dot-string local parts
    ("FROM:<.user@example.test>", 501, "5.1.7", "empty atom"),
    ("FROM:<user.@example.test>", 501, "5.1.7", "empty atom"),
    ("FROM:<us..er@example.test>", 501, "5.1.7", "empty atom"),
    ("FROM:<us er@example.test>", 501, "5.1.7", "' ' not allowed"),
    ("FROM:< user@example.test>", 501, "5.1.7", "' ' not allowed"),
    ("FROM:<user@example.test >", 501, "5.1.7", "' ' not allowed in domain"),
    ("FROM:<user @example.test>", 501, "5.1.7", "' ' not allowed"),
    ("FROM:<us(er)@example.test>", 501, "5.1.7", "'(' not allowed"),
    ("FROM:<us,er@example.test>", 501, "5.1.7", "',' not allowed"),
    ("FROM:<us[er@example.test>", 501, "5.1.7", "unbalanced bracket"),
    ("FROM:<us\\@er@example.test>", 501, "5.1.7", "'\\\\' not allowed"),
    ('FROM:<us"er"@example.test>', 501, "5.1.7", "'\"' not allowed"),
    ("FROM:<a@b@example.test>", 501, "5.1.7", "'@' not allowed in domain"),
    # Quoted-string local parts
    ('FROM:<"a\\\x01"@example.test>', 501, "5.1.7", "control character"),
    ('FROM:<"a\tb"@example.test>', 501, "5.1.7", "control character"),
    # control characters anywhere in the path, CR/LF/NUL in particular
    ("FROM:<us\x00er@example.test>", 501, "5.1.7", "control character"),
    ("FROM:<us\rer@example.test>", 501, "5.1.7", "control character"),
    ("FROM:<us\ner@example.test>", 501, "5.1.7", "control character"),
    ("FROM:<user@exa\r\nmple.test>", 501, "5.1.7", "control character"),
    ("FROM:<us\x7fer@example.test>", 501, "5.1.7", "control character"),
    ("FROM:<us\ter@example.test>", 501, "5.1.7", "control character"),
    ('FROM:<"us\x00er"@example.test>', 501, "5.1.7", "control character"),
    # domains
    ("FROM:<user@example.test.>", 501, "5.1.7", "trailing dot"),
    ("FROM:<user@.example.test>", 501, "5.1.7", "empty domain label"),
    ("FROM:<user@example..test>", 501, "5.1.7", "empty domain label"),
    ("FROM:<user@-example.test>", 501, "5.1.7", "begins or ends with '-'"),
    ("FROM:<user@example-.test>", 501, "5.1.7", "begins or ends with '-'"),
    ("FROM:<user@exa_mple.test>", 501, "5.1.7", "'_' not allowed in domain"),
    ("FROM:<user@exa mple.test>", 501, "5.1.7", "' ' not allowed in domain"),
    ("FROM:<user@example.test:25>", 501, "5.1.7", "':' not allowed in domain"),
    ('FROM:<user@"example".test>', 501, "5.1.7", "'\"' not allowed in domain"),
    # address literals
    ("FROM:<user@[]>", 501, "5.1.7", "empty address literal"),
    ("FROM:<user@[192.0.2.256]>", 501, "5.1.7", "out of range"),
    ("FROM:<user@[192.0.2]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.2.1.5]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.2.]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.2.1234]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.2.-1]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.02.1]>", 501, "5.1.7", "leading zero"),
    ("FROM:<user@[0x7f.0.0.1]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[example.test]>", 501, "5.1.7", "bad IPv4"),
    ("FROM:<user@[192.0.2.1]x>", 501, "5.1.7", "malformed address literal"),
    ("FROM:<user@[192.0.2.1].test>", 501, "5.1.7", "malformed address literal"),
    ("FROM:<user@x[192.0.2.1]>", 501, "5.1.7", "'[' not allowed in domain"),
    ("FROM:<user@[IPv6:2001:db8::g]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:2001:db8::1%eth0]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:2001:db8::1::2]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:1:2:3:4:5:6:7:8:9]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:1:2:3:4:5:6:7]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:192.0.2.1]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[IPv6:::ffff:192.0.02.1]>", 501, "5.1.7", "bad IPv6"),
    ("FROM:<user@[2001:db8::1]>", 501, "5.1.7", "unsupported address literal tag '2001'"),
    ("FROM:<user@[IPv6:1:2:3:4:5:6:7::]>", 501, "5.1.7", "single group"),
    ("FROM:<user@[IPv6:1:2:3:4:5::192.0.2.1]>", 501, "5.1.7", "single group"),
    ("FROM:<user@[x-tag:some-content]>", 501, "5.1.7", "unsupported address literal tag"),
    ("FROM:<user@[x-tag:]>", 501, "5.1.7", "bad General-address-literal"),
    ("FROM:<user@[x_tag:abc]>", 501, "5.1.7", "bad address literal tag"),
    ("FROM:<user@[tag-:abc]>", 501, "5.1.7", "bad address literal tag"),
    # source routes
    ("FROM:<@:user@example.test>", 501, "5.1.7", "bad source route hop"),
    ("FROM:<@relay.test user@example.test>", 501, "5.1.7", "source route without ':'"),
    ("FROM:<@a.test,b.test:user@example.test>", 501, "5.1.7", "bad source route hop 'b.test'"),
    ("FROM:<@a.test,,@b.test:user@example.test>", 501, "5.1.7", "bad source route hop ''"),
    ("FROM:<@a.test,:user@example.test>", 501, "5.1.7", "bad source route hop ''"),
    ("FROM:<@[192.0.2.1]:user@example.test>", 501, "5.1.7", "'[' not allowed in domain"),
    ("FROM:<@a_b.test:user@example.test>", 501, "5.1.7", "'_' not allowed in domain"),
    ("FROM:<@relay.test:>", 501, "5.1.7", "missing '@'"),
    ("FROM:<@relay.test:user>", 501, "5.1.7", "missing '@'"),
    ("FROM:<relay.test:user@example.test>", 501, "5.1.7", "':' not allowed in unquoted local"),
]


@pytest.mark.parametrize(("arg", "code", "status", "fragment"), BAD_MAIL)
def test_mail_from_bad(arg: str, code: int, status: str, fragment: str) -> None:
    assert_reply(rejected(lambda: mail(arg)), code, status, fragment)


def _as_rcpt(arg: str) -> str:
    """The same argument for RCPT: FROM: becomes TO:, a stray TO: becomes FROM:."""
    if arg.startswith("FROM"):
        return "TO" + arg[4:]
    if arg.startswith("TO:"):
        return "FROM:" + arg[3:]
    return arg


@pytest.mark.parametrize(
    ("arg", "code", "status", "fragment"),
    [case for case in BAD_MAIL if case[0] != "FROM:<Postmaster>"],
)
def test_rcpt_to_bad(arg: str, code: int, status: str, fragment: str) -> None:
    rcpt_status = "5.1.3" if status == "5.1.7" else status
    rcpt_fragment = "TO:" if fragment == "FROM:" else fragment
    err = rejected(lambda: rcpt(_as_rcpt(arg)))
    assert_reply(err, code, rcpt_status, rcpt_fragment)


BAD_RCPT: list[tuple[str, int, str, str]] = [
    ("TO:<>", 501, "5.1.3", "null path"),
    ("TO: <>", 501, "5.1.3", "null path"),
    ("TO:<> NOTIFY=NEVER", 501, "5.1.3", "null path"),
    ('TO:<"Postmaster">', 501, "5.1.3", "missing '@' after quoted"),
    ("TO:<@relay.test:Postmaster>", 501, "5.1.3", "missing '@'"),
    ("TO:<Postmaster@>", 501, "5.1.3", "missing domain"),
    ("TO:<Post master>", 501, "5.1.3", "missing '@'"),
    ("TO:<Postmasters>", 501, "5.1.3", "missing '@'"),
    ("TO:<Postmaster.>", 501, "5.1.3", "missing '@'"),
    ("FROM:<user@example.test>", 501, "5.5.4", "TO:"),
    ("RCPT TO:<user@example.test>", 501, "5.5.4", "TO:"),
]


@pytest.mark.parametrize(("arg", "code", "status", "fragment"), BAD_RCPT)
def test_rcpt_to_specific_rejections(arg: str, code: int, status: str, fragment: str) -> None:
    assert_reply(rejected(lambda: rcpt(arg)), code, status, fragment)


def test_error_carries_a_reply_and_is_a_mailgate_error() -> None:
    err = rejected(lambda: mail("FROM:<user>"))
    assert isinstance(err, MailgateError)
    assert err.reply.render() == "501 5.1.7 Bad sender address syntax"
    assert str(err) == err.detail == "missing '@'"
    err = rejected(lambda: rcpt("TO:<user>"))
    assert err.reply.render() == "501 5.1.3 Bad recipient address syntax"


# --- size limits (RFC 5321 4.5.3.1) ------------------------------------------------------------

L63 = "a" * 63
DOMAIN_189 = f"{'b' * 63}.{'c' * 63}.{'d' * 61}"
assert len(DOMAIN_189) == 189
U57 = "a" * 55 + "ü"  # 57 octets of UTF-8, 63 as an A-label (xn--aaa...a-xxx)
U_DOMAIN_231 = f"{U57}.{U57}.{U57}.{U57}"  # 231 octets as written, 255 as A-labels
assert len(U_DOMAIN_231.encode()) == 231


@pytest.mark.parametrize(
    "path",
    [
        f"{'a' * 64}@example.test",  # local part of 64 octets
        f'"{"a b" * 20}{"x" * 2}"@example.test',  # quoted: 62 characters + 2 quotes
        f"u@{L63}.example.test",  # label of 63 octets
        f"{'a' * 64}@{DOMAIN_189}",  # path of exactly 256 octets with <>
        f"u@{'a' * 55}ü.test",  # U-label: its A-label has exactly 63 octets
        f"u@{U_DOMAIN_231}",  # domain of exactly 255 octets in A-label form
    ],
)
def test_limits_at_the_boundary_are_accepted(path: str) -> None:
    assert len(f"<{path}>".encode()) <= 256
    assert mail(f"FROM:<{path}> SMTPUTF8").address.addr == path
    assert rcpt(f"TO:<{path}>", utf8=True).address.addr == path


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (f"{'a' * 65}@example.test", "local part exceeds 64"),
        (f'"{"a b" * 21}"@example.test', "local part exceeds 64"),  # 63 characters + quotes
        (f"{'é' * 33}@example.test", "local part exceeds 64"),  # 33 characters, 66 octets
        (f"u@{'a' * 64}.example.test", "label exceeds 63"),
        (f"u@{'a' * 56}ü.test", "label exceeds 63 octets as an A-label"),
        (f"u@{L63}.{L63}.{L63}.{L63}.a", "domain exceeds 255"),
        (f"u@{U_DOMAIN_231}.ab", "domain exceeds 255"),  # 234 octets written, 258 as A-labels
        (f"{'a' * 64}@{DOMAIN_189}x", "path exceeds 256"),
        (f"@{L63}.test,@{L63}.test:{'a' * 64}@{L63}.test", "path exceeds 256"),
    ],
)
def test_limits_exceeded(path: str, fragment: str) -> None:
    sender = rejected(lambda: mail(f"FROM:<{path}> SMTPUTF8"))
    assert_reply(sender, 501, "5.1.7", fragment)
    assert sender.reply.text == "Sender address too long"
    recipient = rejected(lambda: rcpt(f"TO:<{path}>", utf8=True))
    assert_reply(recipient, 501, "5.1.3", fragment)
    assert recipient.reply.text == "Recipient address too long"


# --- SMTPUTF8 (RFC 6531) ---------------------------------------------------------------------

# (path, expected Address, domain_key)
GOOD_UTF8: list[tuple[str, Address, str]] = [
    ("pelé@example.test", Address("pelé", "example.test"), "example.test"),
    ("用户@例子.测试", Address("用户", "例子.测试"), "xn--fsqu00a.xn--0zwm56d"),
    (
        "δοκιμή@παράδειγμα.δοκιμή",
        Address("δοκιμή", "παράδειγμα.δοκιμή"),
        "xn--hxajbheg2az3al.xn--jxalpdlp",
    ),
    ("user@bücher.example", Address("user", "bücher.example"), "xn--bcher-kva.example"),
    ("user@Bücher.Example", Address("user", "Bücher.Example"), "xn--bcher-kva.example"),
    ("user@münchen.test", Address("user", "münchen.test"), "xn--mnchen-3ya.test"),
    ("user@straße.test", Address("user", "straße.test"), "xn--strae-oqa.test"),
    ('"jöhn dœ"@example.test', Address("jöhn dœ", "example.test", quoted=True), "example.test"),
    ('"a\u00a0b"@example.test', Address("a\u00a0b", "example.test", quoted=True), "example.test"),
    ("@relé.test:u@example.test", Address("u", "example.test", ("relé.test",)), "example.test"),
    ("user@[192.0.2.1]", Address("user", "[192.0.2.1]", literal=True), "[192.0.2.1]"),
]


@pytest.mark.parametrize(("path", "address", "key"), GOOD_UTF8)
def test_utf8_paths_with_smtputf8(path: str, address: Address, key: str) -> None:
    for parsed in (
        mail(f"FROM:<{path}> SMTPUTF8"),
        mail(f"FROM:<{path}> BODY=8BITMIME SMTPUTF8"),
        rcpt(f"TO:<{path}>", utf8=True),
    ):
        assert parsed.address == address
        assert parsed.address.domain_key == key


@pytest.mark.parametrize("path", [path for path, _, _ in GOOD_UTF8 if not path.isascii()])
def test_utf8_paths_without_smtputf8(path: str) -> None:
    no_param = rejected(lambda: mail(f"FROM:<{path}>", enabled=True))
    assert_reply(no_param, 550, "5.6.7", "non-ASCII")
    not_offered = rejected(lambda: mail(f"FROM:<{path}> SMTPUTF8", enabled=False))
    assert_reply(not_offered, 550, "5.6.7", "non-ASCII")
    assert not_offered.reply.text == "Non-ASCII addresses not permitted for that sender"
    recipient = rejected(lambda: rcpt(f"TO:<{path}>", utf8=False))
    assert_reply(recipient, 553, "5.6.7", "non-ASCII")
    assert recipient.reply.text == "Non-ASCII addresses not permitted for that recipient"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("pel\u0065\u0301@ex\u0065\u0301.test", "not in NFC"),  # decomposed é in the domain
        ("user@☃.test", "not allowed in a U-label"),  # symbol (So)
        ("user@a\u00a0b.test", "not allowed in a U-label"),  # no-break space
        ("user@ab½.test", "not allowed in a U-label"),  # No
        ("user@\u0301ab.test", "begins with a combining mark"),
        ("user@ab--ü.test", "'--' in positions 3 and 4"),
        ("user@-ü.test", "begins or ends with '-'"),
        ("user@ü_x.test", "'_' not allowed in domain"),
        ("a\u00a0b@example.test", "not allowed in unquoted local part"),  # Zs
        ("a\u3000b@example.test", "not allowed in unquoted local part"),  # ideographic space
        ("a\u2028b@example.test", "not allowed in unquoted local part"),  # Zl
        ('"a\u2028b"@example.test', "not allowed in quoted local part"),
        ("a\x85b@example.test", "control character"),  # C1 NEL
        ("a\udce9b@example.test", "invalid UTF-8"),  # an undecodable byte (surrogateescape)
        ('"a\\é"@example.test', "bad quoted-pair"),
        ("user@[192.0.2.é]", "bad IPv4"),
    ],
)
def test_utf8_bad_paths(path: str, fragment: str) -> None:
    assert_reply(rejected(lambda: mail(f"FROM:<{path}> SMTPUTF8")), 501, "5.1.7", fragment)
    assert_reply(rejected(lambda: rcpt(f"TO:<{path}>", utf8=True)), 501, "5.1.3", fragment)


def test_non_ascii_refusal_comes_before_utf8_validity() -> None:
    # Without SMTPUTF8, any non-ASCII (even an undecodable byte) is the RFC 6531 refusal ...
    assert_reply(rejected(lambda: rcpt("TO:<a\udce9b@example.test>")), 553, "5.6.7", "non-ASCII")
    # ... but ASCII controls are a syntax error whatever else the path holds.
    assert_reply(rejected(lambda: rcpt("TO:<a\x00é@example.test>")), 501, "5.1.3", "control")


def test_smtputf8_parameter_requires_the_server_to_offer_it() -> None:
    err = rejected(lambda: mail("FROM:<user@example.test> SMTPUTF8", enabled=False))
    assert_reply(err, 555, "5.5.4", "not offered")
    err = rejected(lambda: mail("FROM:<> smtputf8", enabled=False))
    assert_reply(err, 555, "5.5.4", "not offered")


def test_smtputf8_parameter_takes_no_value() -> None:
    err = rejected(lambda: mail("FROM:<user@example.test> SMTPUTF8=yes"))
    assert_reply(err, 501, "5.5.4", "takes no value")


def test_smtputf8_enabled_without_parameter_is_plain_ascii() -> None:
    parsed = mail("FROM:<user@example.test>", enabled=True)
    assert not parsed.has_param("SMTPUTF8")
    parsed = mail("FROM:<user@example.test> SMTPUTF8", enabled=True)
    assert parsed.has_param("SMTPUTF8")
    assert parsed.param("SMTPUTF8") is None


def test_smtputf8_on_rcpt_is_left_to_the_caller() -> None:
    parsed = rcpt("TO:<user@example.test> SMTPUTF8")
    assert parsed.params == (("SMTPUTF8", None),)


# --- parameters ------------------------------------------------------------------------------


def test_mail_parameters() -> None:
    parsed = mail("FROM:<user@example.test> SIZE=123 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B")
    assert parsed.address == Address("user", "example.test")
    assert parsed.params == (
        ("SIZE", "123"),
        ("BODY", "8BITMIME"),
        ("SMTPUTF8", None),
        ("RET", "HDRS"),
        ("ENVID", "QQ+2B"),
    )
    assert parsed.param("size") == "123"
    assert parsed.param("ENVID") == "QQ+2B"
    assert xtext_decode(parsed.param("ENVID") or "") == "QQ+"
    assert parsed.has_param("smtputf8") and parsed.param("SMTPUTF8") is None
    assert not parsed.has_param("AUTH") and parsed.param("AUTH") is None
    assert parsed.params_dict == {
        "SIZE": "123",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
        "RET": "HDRS",
        "ENVID": "QQ+2B",
    }


def test_rcpt_parameters() -> None:
    parsed = rcpt("TO:<user@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@x.test")
    assert parsed.address == Address("user", "example.test")
    assert parsed.params == (("NOTIFY", "SUCCESS,FAILURE"), ("ORCPT", "rfc822;a+2Bb@x.test"))
    assert xtext_decode(parsed.param("ORCPT") or "") == "rfc822;a+b@x.test"


@pytest.mark.parametrize(
    ("tail", "params"),
    [
        ("", ()),
        (" ", ()),
        (" size=1", (("SIZE", "1"),)),  # keyword upper-cased, value kept
        (" BODY=8bitmime", (("BODY", "8bitmime"),)),
        ("  SIZE=1   BODY=7BIT  ", (("SIZE", "1"), ("BODY", "7BIT"))),  # runs of spaces
        (" X-VENDOR-1=a!b<c>~", (("X-VENDOR-1", "a!b<c>~"),)),
        (" 8BIT", (("8BIT", None),)),
        (" AUTH=<>", (("AUTH", "<>"),)),
    ],
)
def test_parameter_forms(tail: str, params: tuple[tuple[str, str | None], ...]) -> None:
    assert mail(f"FROM:<user@example.test>{tail}").params == params
    assert rcpt(f"TO:<user@example.test>{tail}").params == params


@pytest.mark.parametrize(
    ("tail", "fragment"),
    [
        (" SIZE=", "empty value"),
        (" =1", "bad parameter keyword ''"),
        (" -SIZE=1", "bad parameter keyword"),
        (" SI_ZE=1", "bad parameter keyword"),
        (" SIZE:1", "bad parameter keyword"),
        (" SIZE=1=2", "'=' not allowed"),
        (" SIZE=1 size=2", "duplicate parameter SIZE"),
        (" SIZE=1\tBODY=7BIT", "'\\t' not allowed"),
        (" SIZE=\x00", "'\\x00' not allowed"),
        (" SIZE=1\r\n", "'\\r' not allowed"),
        (" ENVID=\x7f", "'\\x7f' not allowed"),
        (" ENVID=é", "non-ASCII ENVID value without SMTPUTF8"),
        (" SÍZE=1", "bad parameter keyword"),
    ],
)
def test_bad_parameters(tail: str, fragment: str) -> None:
    assert_reply(rejected(lambda: mail(f"FROM:<user@example.test>{tail}")), 501, "5.5.4", fragment)
    assert_reply(rejected(lambda: rcpt(f"TO:<user@example.test>{tail}")), 501, "5.5.4", fragment)


def test_utf8_parameter_values_under_smtputf8() -> None:
    assert mail("FROM:<pelé@example.test> SMTPUTF8 ENVID=é").param("ENVID") == "é"
    assert rcpt("TO:<u@example.test> X-NOTE=é", utf8=True).param("X-NOTE") == "é"
    err = rejected(lambda: rcpt("TO:<u@example.test> X-NOTE=a\u00a0b", utf8=True))
    assert_reply(err, 501, "5.5.4", "not allowed in X-NOTE value")
    err = rejected(lambda: mail("FROM:<u@example.test> SMTPUTF8 ENVID=\x85"))
    assert_reply(err, 501, "5.5.4", "not allowed in ENVID value")


def test_path_errors_are_reported_before_parameter_errors() -> None:
    assert_reply(rejected(lambda: mail("FROM:<user> SIZE=")), 501, "5.1.7", "missing '@'")


# --- xtext (RFC 3461 section 4) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("xtext", "text"),
    [
        ("", ""),
        ("QQ+2B", "QQ+"),
        ("rfc822;a+2Bb@x.test", "rfc822;a+b@x.test"),
        ("a+3Db", "a=b"),
        ("a+20b", "a b"),
        ("+2B+2B", "++"),
        ("!~", "!~"),
        ("+41", "A"),
        ("+C3+A9", "é"),
        ("rfc822;user+40example.test", "rfc822;user@example.test"),
    ],
)
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize(
    ("xtext", "fragment"),
    [
        ("+2b", "bad xtext hexchar"),  # RFC 3461: upper-case hex digits
        ("+2", "bad xtext hexchar"),
        ("+", "bad xtext hexchar"),
        ("a+G0", "bad xtext hexchar"),
        ("a+ 2", "bad xtext hexchar"),
        ("a=b", "invalid xtext character '='"),
        ("a b", "invalid xtext character ' '"),
        ("é", "invalid xtext character"),
        ("a\x00", "invalid xtext character"),
        ("+FF", "does not decode to UTF-8"),
        ("+C3", "does not decode to UTF-8"),
        ("a+0D+0AX-Injected:+20yes", "control character"),
        ("+00", "control character"),
        ("+7F", "control character"),
        ("+C2+85", "control character"),  # C1 NEL
    ],
)
def test_xtext_decode_rejects(xtext: str, fragment: str) -> None:
    assert_reply(rejected(lambda: xtext_decode(xtext)), 501, "5.5.4", fragment)


@pytest.mark.parametrize(
    ("text", "xtext"),
    [
        ("", ""),
        ("QQ+", "QQ+2B"),
        ("rfc822;a+b@x.test", "rfc822;a+2Bb@x.test"),
        ("a=b", "a+3Db"),
        ("a b", "a+20b"),
        ("é", "+C3+A9"),
        ("a\r\n", "a+0D+0A"),
        ("!~", "!~"),
    ],
)
def test_xtext_encode(text: str, xtext: str) -> None:
    assert xtext_encode(text) == xtext


@pytest.mark.parametrize(
    "text", ["plain", "with space", "+=+=", 'rfc822;"q u"@x.test', "δοκιμή", "tab-free ~!"]
)
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert all("!" <= ch <= "~" and ch != "=" for ch in encoded)
    assert xtext_decode(encoded) == text


# --- value objects ---------------------------------------------------------------------------


def test_values_are_frozen() -> None:
    address = Address("user", "example.test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.local = "other"  # type: ignore[misc]
    parsed = PathArg(address)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.params = ()  # type: ignore[misc]
    assert hash(address) == hash(Address("user", "example.test"))


@pytest.mark.parametrize(
    ("address", "addr"),
    [
        (Address("user", "example.test"), "user@example.test"),
        (Address("a b", "example.test"), '"a b"@example.test'),
        (Address('a"b\\c', "example.test"), '"a\\"b\\\\c"@example.test'),
        (Address("a.b", "example.test", quoted=True), "a.b@example.test"),
        (Address("a.", "example.test"), '"a."@example.test'),
        (Address("", "example.test"), '""@example.test'),
        (Address("postmaster", ""), "postmaster"),
        (Address("u", "example.test", source_route=("relay.test",)), "u@example.test"),
        (NULL, ""),
    ],
)
def test_addr_quotes_only_when_needed(address: Address, addr: str) -> None:
    assert address.addr == addr


def test_domain_key_of_a_hand_built_bad_domain_falls_back_to_lower_case() -> None:
    assert Address("u", "Not A_Domain").domain_key == "not a_domain"
    assert Address("u", "[Bogus]", literal=True).domain_key == "[bogus]"
    assert Address("u", "[Bogus]", literal=True).ip is None
