"""Strict parsing of the SMTP envelope: the arguments of ``MAIL FROM:`` and ``RCPT TO:``.

Covers RFC 5321 section 4.1.2 (Reverse-path, Forward-path, A-d-l source routes, Mailbox,
Local-part as Dot-string or Quoted-string, Domain, address-literal, Mail-parameters and
Rcpt-parameters), the RFC 6531 SMTPUTF8 extensions (UTF-8 local parts, U-label domains, UTF-8
parameter values) and the RFC 3461 xtext helpers used by ``ENVID`` and ``ORCPT``.

The module reports facts -- what was written, in which form, and which routing tricks it uses
-- and raises :class:`AddressError` carrying the exact reply when the text is not a valid path.
Relaying, which parameters are supported and every other policy decision belong to the caller.

Replies (RFC 5321 code, RFC 3463 enhanced status code)::

    condition                                              MAIL        RCPT
    no FROM: / TO: keyword                                 501 5.5.4   501 5.5.4
    path syntax (brackets, quotes, local part, domain,     501 5.1.7   501 5.1.3
      address literal, source route, controls, spaces)
    null path <>                                           accepted    501 5.1.3
    size limits (RFC 5321 4.5.3.1: local part 64, domain   501 5.1.7   501 5.1.3
      255, label 63, path 256 octets)
    non-ASCII address without SMTPUTF8 (RFC 6531 3.5)      550 5.6.7   553 5.6.7
    parameter syntax, duplicate, SMTPUTF8=value            501 5.5.4   501 5.5.4
    SMTPUTF8 parameter the server did not offer            555 5.5.4   (caller)

Size limits use 501 because RFC 5321 4.5.3.1.9 gives ``501 Path too long`` as the example; the
enhanced code stays the address-syntax one (X.1.7 sender, X.1.3 recipient) since RFC 3463 has no
code for an over-long address. 553 is used only where RFC 6531 requires it.

Deliberate strictness and tolerance beyond the ABNF:

* tolerated: spaces before ``FROM:``/``TO:``, after the colon, between parameters and at the end;
* refused: an empty Quoted-string local part (``""@example.test``), a trailing dot in the domain,
  General-address-literals (no tag but ``IPv6`` is registered), IPv4 octets with leading zeros
  (``[192.0.02.1]``, octal-ambiguous), IPv6 scope ids, ``::`` standing for a single group;
* refused: Unicode white space (Zs/Zl/Zp) outside a Quoted-string, C1 controls and lone
  surrogates (undecodable bytes when the line was decoded with ``surrogateescape``);
* U-labels must be NFC and built of letters, marks, decimal digits and hyphens (a stdlib
  approximation of IDNA2008: no bidi or contextual rules); upper case is accepted and folded.

Lengths are counted in UTF-8 octets: the local part in its canonical form (as :attr:`Address.addr`
writes it), the domain in A-label form, the path as written including ``<>``.
"""

from __future__ import annotations

import functools
import ipaddress
import string
import unicodedata
from dataclasses import dataclass
from typing import Final, Literal

from gateway.errors import MailgateError
from gateway.replies import Reply

__all__ = [
    "MAX_DOMAIN",
    "MAX_LABEL",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "NULL",
    "Address",
    "AddressError",
    "PathArg",
    "parse_mail_from",
    "parse_rcpt_to",
    "xtext_decode",
    "xtext_encode",
]

MAX_LOCAL_PART: Final = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN: Final = 255  # RFC 5321 4.5.3.1.2
MAX_PATH: Final = 256  # RFC 5321 4.5.3.1.3, including "<" and ">"
MAX_LABEL: Final = 63  # RFC 1035 2.3.4

MAIL_USAGE: Final = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_USAGE: Final = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
BAD_SENDER: Final = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT: Final = Reply(501, "5.1.3", "Bad recipient address syntax")
SENDER_TOO_LONG: Final = Reply(501, "5.1.7", "Sender address too long")
RECIPIENT_TOO_LONG: Final = Reply(501, "5.1.3", "Recipient address too long")
SENDER_NOT_ASCII: Final = Reply(550, "5.6.7", "Non-ASCII addresses not permitted for that sender")
RECIPIENT_NOT_ASCII: Final = Reply(
    553, "5.6.7", "Non-ASCII addresses not permitted for that recipient"
)
BAD_PARAM: Final = Reply(501, "5.5.4", "Bad parameter syntax")
SMTPUTF8_NOT_OFFERED: Final = Reply(555, "5.5.4", "SMTPUTF8 not supported")

_LET_DIG: Final = frozenset(string.ascii_letters + string.digits)
_LDH: Final = _LET_DIG | {"-"}
_DIGITS: Final = frozenset(string.digits)
_HEXDIG: Final = frozenset(string.hexdigits)
_XTEXT_HEX: Final = frozenset("0123456789ABCDEF")
_ATEXT: Final = _LET_DIG | frozenset("!#$%&'*+-/=?^_`{|}~")  # RFC 5322 3.2.3
# Non-ASCII characters refused in a Dot-string / a Quoted-string / a parameter value.
_BAD_UNQUOTED: Final = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})
_BAD_QUOTED: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})
# U-label characters: IDNA2008 PVALID is (roughly) letters, marks and decimal digits, plus a few
# CONTEXTJ/CONTEXTO code points; upper case letters are accepted here and folded for the key.
_ULABEL_CATEGORIES: Final = frozenset({"Ll", "Lu", "Lt", "Lm", "Lo", "Mn", "Mc", "Nd"})
_ULABEL_EXTRA: Final = frozenset("\u00b7\u0375\u05f3\u05f4\u30fb\u200c\u200d")


class AddressError(MailgateError):
    """A MAIL/RCPT argument is not acceptable: ``reply`` is the answer, ``detail`` is for logs."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        self.reply = reply
        self.detail = detail or reply.text
        super().__init__(self.detail)


class _Invalid(Exception):
    """Internal: a path problem, mapped to the MAIL or RCPT reply by the caller of the helper."""

    def __init__(self, kind: Literal["syntax", "long", "ascii"], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Address:
    """One envelope address, as written (the local part unquoted and unescaped).

    ``domain`` keeps the text after ``@`` (U-labels as sent, address literals with their
    brackets); it is empty only for :data:`NULL` and for the bare ``RCPT TO:<Postmaster>``.
    ``source_route`` holds the RFC 5321 A-d-l hops (obsolete; parsed so policy can refuse them).
    """

    local: str
    domain: str
    source_route: tuple[str, ...] = ()
    quoted: bool = False  # the local part was written as a Quoted-string
    literal: bool = False  # the domain is an address literal: [192.0.2.1], [IPv6:2001:db8::1]

    @property
    def is_null(self) -> bool:
        """The null reverse-path ``<>``."""
        return not self.local and not self.domain

    @property
    def addr(self) -> str:
        """``local@domain`` with the local part quoted only if it must be; "" for the null path.

        The source route is not part of it (RFC 5321 C: "MUST accept and ignore").
        """
        if self.is_null:
            return ""
        local = _quote_local(self.local)
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def domain_key(self) -> str:
        """The domain for lookups: lower-case, internationalized labels as A-labels (``xn--``).

        ``bücher.Example`` and ``XN--BCHER-KVA.example`` both give ``xn--bcher-kva.example``.
        Address literals give ``[192.0.2.1]`` or ``[ipv6:<compressed IPv6>]``.
        """
        if not self.domain:
            return ""
        try:
            return _literal_key(self.domain) if self.literal else _domain_key(self.domain)
        except (_Invalid, UnicodeError):  # only for an Address built by hand from bad text
            return self.domain.lower()

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The address of an address-literal domain, else None."""
        if not self.literal:
            return None
        try:
            return _literal_ip(self.domain)
        except _Invalid:
            return None

    @property
    def routing_tricks(self) -> tuple[str, ...]:
        """Forms that ask a relay to route onward, in a fixed order:

        ``source-route``, ``percent-hack`` (``%`` in the local part), ``bang-path`` (``!`` in the
        local part), ``quoted-at`` (``@`` in a quoted local part), ``address-literal``.
        """
        tricks: list[str] = []
        if self.source_route:
            tricks.append("source-route")
        if "%" in self.local:
            tricks.append("percent-hack")
        if "!" in self.local:
            tricks.append("bang-path")
        if "@" in self.local:  # only a Quoted-string can hold one
            tricks.append("quoted-at")
        if self.literal:
            tricks.append("address-literal")
        return tuple(tricks)


NULL: Final = Address("", "")


@dataclass(frozen=True, slots=True)
class PathArg:
    """A parsed MAIL/RCPT argument: the address and its ESMTP parameters in the order given.

    Parameter keywords are upper-cased; values are as given (None for a keyword alone).
    """

    address: Address
    params: tuple[tuple[str, str | None], ...] = ()

    def has_param(self, key: str) -> bool:
        """Whether the keyword was given (case-insensitive)."""
        key = key.upper()
        return any(k == key for k, _ in self.params)

    def param(self, key: str) -> str | None:
        """The value given for ``key`` (case-insensitive); None if absent or given without value.

        Use :meth:`has_param` to tell those two apart (``SMTPUTF8`` never has a value).
        """
        key = key.upper()
        for k, value in self.params:
            if k == key:
                return value
        return None

    @property
    def params_dict(self) -> dict[str, str | None]:
        """The parameters as a new dict (keywords are unique, so nothing is lost)."""
        return dict(self.params)


@dataclass(frozen=True, slots=True)
class _Verb:
    keyword: str  # "FROM:" / "TO:"
    usage: Reply
    syntax: Reply
    too_long: Reply
    non_ascii: Reply

    def error(self, problem: _Invalid) -> AddressError:
        reply = {"syntax": self.syntax, "long": self.too_long, "ascii": self.non_ascii}
        return AddressError(reply[problem.kind], problem.detail)


_MAIL: Final = _Verb("FROM:", MAIL_USAGE, BAD_SENDER, SENDER_TOO_LONG, SENDER_NOT_ASCII)
_RCPT: Final = _Verb("TO:", RCPT_USAGE, BAD_RECIPIENT, RECIPIENT_TOO_LONG, RECIPIENT_NOT_ASCII)


def parse_mail_from(arg: str, *, smtputf8_enabled: bool) -> PathArg:
    """Parse the text after ``MAIL``, e.g. ``FROM:<a@b.test> SIZE=100 BODY=8BITMIME``.

    ``smtputf8_enabled`` says whether this server offered SMTPUTF8 in its EHLO reply. UTF-8 in
    the address and in parameter values is accepted only when it is enabled *and* this command
    carries the ``SMTPUTF8`` parameter; that parameter without the server offering it is refused
    with 555. ``FROM:<>`` gives :data:`NULL`.
    """
    path, tail = _split_command(arg, _MAIL)
    asked = any(_keyword_of(token) == "SMTPUTF8" for token in tail.split(" "))
    utf8 = smtputf8_enabled and asked
    address = _parse_path(path, _MAIL, utf8=utf8, null_ok=True, postmaster_ok=False)
    params = _parse_params(tail, utf8=utf8)
    if asked:
        if not smtputf8_enabled:
            raise AddressError(SMTPUTF8_NOT_OFFERED, "SMTPUTF8 parameter but SMTPUTF8 not offered")
        if dict(params)["SMTPUTF8"] is not None:
            raise AddressError(BAD_PARAM, "SMTPUTF8 takes no value")
    return PathArg(address, params)


def parse_rcpt_to(arg: str, *, smtputf8_ok: bool) -> PathArg:
    """Parse the text after ``RCPT``, e.g. ``TO:<a@b.test> NOTIFY=SUCCESS,FAILURE``.

    ``smtputf8_ok`` says whether this transaction's MAIL command carried SMTPUTF8 (and the server
    offered it). ``TO:<Postmaster>`` (any case) is accepted without a domain; ``TO:<>`` is not.
    Which parameters are allowed is the caller's business.
    """
    path, tail = _split_command(arg, _RCPT)
    address = _parse_path(path, _RCPT, utf8=smtputf8_ok, null_ok=False, postmaster_ok=True)
    return PathArg(address, _parse_params(tail, utf8=smtputf8_ok))


def xtext_decode(s: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` with two upper-case hex digits for an octet).

    The octets are decoded as UTF-8. Raises :class:`AddressError` (501 5.5.4) for characters
    outside xchar, a malformed ``+XX``, invalid UTF-8, or a decoded control character (which
    could otherwise be carried into a DSN's header).
    """
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "+":
            pair = s[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _XTEXT_HEX for c in pair):
                raise AddressError(BAD_PARAM, f"bad xtext hexchar {s[i : i + 3]!r}")
            out.append(int(pair, 16))
            i += 3
        elif "!" <= ch <= "~" and ch != "=":
            out.append(ord(ch))
            i += 1
        else:
            raise AddressError(BAD_PARAM, f"invalid xtext character {ch!r}")
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AddressError(BAD_PARAM, "xtext does not decode to UTF-8") from exc
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise AddressError(BAD_PARAM, "control character in decoded xtext")
    return text


def xtext_encode(s: str) -> str:
    """Encode as RFC 3461 xtext: ``!``..``~`` except ``+`` and ``=`` as is, other octets of the
    UTF-8 form as ``+XX``. Raises :class:`UnicodeEncodeError` for lone surrogates."""
    parts: list[str] = []
    for ch in s:
        if "!" <= ch <= "~" and ch not in "+=":
            parts.append(ch)
        else:
            parts.extend(f"+{octet:02X}" for octet in ch.encode("utf-8"))
    return "".join(parts)


# --- command and path ------------------------------------------------------------------------


def _split_command(arg: str, verb: _Verb) -> tuple[str, str]:
    """Check ``FROM:``/``TO:`` and return the path with its brackets and the parameter text."""
    text = arg.lstrip(" ")
    head = text[: len(verb.keyword)]
    if not head.isascii() or head.upper() != verb.keyword:
        raise AddressError(verb.usage, f"argument does not start with {verb.keyword}")
    rest = text[len(verb.keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError(verb.syntax, "path not enclosed in angle brackets")
    end = _path_end(rest, verb)
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise AddressError(verb.syntax, f"garbage after path: {tail[:20]!r}")
    return path, tail


def _path_end(text: str, verb: _Verb) -> int:
    """Index of the ``>`` closing the path at ``text[0]``, skipping quoted strings and literals."""
    i, n = 1, len(text)
    while i < n:
        ch = text[i]
        if ch == ">":
            return i
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                raise AddressError(verb.syntax, "unbalanced quote")
        elif ch == "[":
            close = text.find("]", i + 1)
            if close < 0:
                raise AddressError(verb.syntax, "unbalanced bracket")
            i = close
        i += 1
    raise AddressError(verb.syntax, "missing closing '>'")


def _parse_path(
    path: str, verb: _Verb, *, utf8: bool, null_ok: bool, postmaster_ok: bool
) -> Address:
    inner = path[1:-1]
    if not inner:
        if null_ok:
            return NULL
        raise AddressError(verb.syntax, "null path not allowed here")
    try:
        _check_chars(inner, utf8=utf8)
        if postmaster_ok and inner.isascii() and inner.lower() == "postmaster":
            return Address(inner, "")
        address = _parse_inner(inner)
        if len(_quote_local(address.local).encode("utf-8")) > MAX_LOCAL_PART:
            raise _Invalid("long", f"local part exceeds {MAX_LOCAL_PART} octets")
        if len(path.encode("utf-8")) > MAX_PATH:
            raise _Invalid("long", f"path exceeds {MAX_PATH} octets")
    except _Invalid as problem:
        raise verb.error(problem) from None
    return address


def _check_chars(inner: str, *, utf8: bool) -> None:
    if any(ch < " " or ch == "\x7f" for ch in inner):
        raise _Invalid("syntax", "control character in path")
    if inner.isascii():
        return
    if not utf8:
        raise _Invalid("ascii", "non-ASCII address without SMTPUTF8")
    for ch in inner:
        if not ch.isascii() and unicodedata.category(ch) in ("Cc", "Cs"):
            raise _Invalid("syntax", f"control character or invalid UTF-8 {ch!r} in path")


def _parse_inner(inner: str) -> Address:
    """Parse ``[A-d-l ":"] Mailbox`` (the path without its brackets)."""
    route: tuple[str, ...] = ()
    mailbox = inner
    if inner.startswith("@"):
        adl, colon, mailbox = inner.partition(":")
        if not colon:
            raise _Invalid("syntax", "source route without ':'")
        hops: list[str] = []
        for hop in adl.split(","):
            if not hop.startswith("@") or len(hop) == 1:
                raise _Invalid("syntax", f"bad source route hop {hop!r}")
            _domain_key(hop[1:])
            hops.append(hop[1:])
        route = tuple(hops)

    if mailbox.startswith('"'):
        local, at = _parse_quoted(mailbox)
        quoted = True
    else:
        at = mailbox.find("@")
        if at < 0:
            raise _Invalid("syntax", "missing '@'")
        local = mailbox[:at]
        quoted = False
        if local:
            problem = _dot_string_problem(local)
            if problem:
                raise _Invalid("syntax", problem)
    if at >= len(mailbox) or mailbox[at] != "@":
        raise _Invalid("syntax", "missing '@' after quoted local part")
    if not local:
        raise _Invalid("syntax", "empty local part")
    domain = mailbox[at + 1 :]
    if not domain:
        raise _Invalid("syntax", "missing domain")
    literal = domain.startswith("[")
    if literal:
        _literal_key(domain)
    else:
        _domain_key(domain)
    return Address(local, domain, route, quoted, literal)


def _parse_quoted(mailbox: str) -> tuple[str, int]:
    """Unescape the Quoted-string at the start; return it and the index after its closing quote."""
    out: list[str] = []
    i, n = 1, len(mailbox)
    while i < n:
        ch = mailbox[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            nxt = mailbox[i + 1 : i + 2]
            if not nxt or not " " <= nxt <= "~":  # quoted-pairSMTP = "\" %d32-126
                raise _Invalid("syntax", "bad quoted-pair")
            out.append(nxt)
            i += 2
            continue
        if not ch.isascii() and unicodedata.category(ch) in _BAD_QUOTED:
            raise _Invalid("syntax", f"character {ch!r} not allowed in quoted local part")
        out.append(ch)  # ASCII controls were refused already: the rest is qtextSMTP
        i += 1
    raise _Invalid("syntax", "unbalanced quote")


def _dot_string_problem(local: str) -> str | None:
    """Why ``local`` is not a Dot-string (UTF-8 atext allowed), or None if it is one."""
    for atom in local.split("."):
        if not atom:
            return "empty atom in local part (leading, trailing or doubled dot)"
        for ch in atom:
            if ch in _ATEXT:
                continue
            if not ch.isascii() and unicodedata.category(ch) not in _BAD_UNQUOTED:
                continue
            return f"character {ch!r} not allowed in unquoted local part"
    return None


def _quote_local(local: str) -> str:
    """The local part as written in a path: bare if it is a Dot-string, else a Quoted-string."""
    if _dot_string_problem(local) is None:  # "" is not a Dot-string: it gets quoted
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- domains ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)  # the same few domains come in message after message
def _domain_key(domain: str) -> str:
    """Validate a Domain (LDH labels or U-labels) and return its lower-case A-label form."""
    if not domain:
        raise _Invalid("syntax", "empty domain")
    if domain.endswith("."):
        raise _Invalid("syntax", "trailing dot in domain")
    key = ".".join(_label_key(label) for label in domain.split("."))
    # Counted in A-label form (the DNS form; the same as written for ASCII). As written it
    # cannot exceed the limit without the path exceeding MAX_PATH first.
    if len(key) > MAX_DOMAIN:
        raise _Invalid("long", f"domain exceeds {MAX_DOMAIN} octets")
    return key


def _label_key(label: str) -> str:
    if not label:
        raise _Invalid("syntax", "empty domain label")
    if label[0] == "-" or label[-1] == "-":
        raise _Invalid("syntax", f"domain label {label!r} begins or ends with '-'")
    if label.isascii():
        bad = [ch for ch in label if ch not in _LDH]
        if bad:
            raise _Invalid("syntax", f"character {bad[0]!r} not allowed in domain")
        if len(label) > MAX_LABEL:
            raise _Invalid("long", f"domain label exceeds {MAX_LABEL} octets")
        return label.lower()
    # A U-label (RFC 5890 2.3.2.1); non-ASCII only reaches here under SMTPUTF8.
    if not unicodedata.is_normalized("NFC", label):
        raise _Invalid("syntax", f"U-label {label!r} is not in NFC")
    for ch in label:
        if ch.isascii():
            if ch not in _LDH:
                raise _Invalid("syntax", f"character {ch!r} not allowed in domain")
        elif ch not in _ULABEL_EXTRA and unicodedata.category(ch) not in _ULABEL_CATEGORIES:
            raise _Invalid("syntax", f"character {ch!r} not allowed in a U-label")
    if unicodedata.category(label[0]).startswith("M"):
        raise _Invalid("syntax", f"U-label {label!r} begins with a combining mark")
    if label[2:4] == "--":
        raise _Invalid("syntax", f"U-label {label!r} has '--' in positions 3 and 4")
    folded = unicodedata.normalize("NFC", label.lower())
    try:
        alabel = "xn--" + folded.encode("punycode").decode("ascii")
    except UnicodeError as exc:
        raise _Invalid("syntax", f"U-label {label!r} cannot be encoded") from exc
    if len(alabel) > MAX_LABEL:
        raise _Invalid("long", f"domain label exceeds {MAX_LABEL} octets as an A-label")
    return alabel


def _literal_key(domain: str) -> str:
    ip = _literal_ip(domain)
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[ipv6:{ip.compressed}]"
    return f"[{ip}]"


def _literal_ip(domain: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Validate ``[IPv4]`` or ``[IPv6:...]``; General-address-literals are refused."""
    if not domain.endswith("]") or domain.count("[") != 1 or domain.count("]") != 1:
        raise _Invalid("syntax", "malformed address literal")
    body = domain[1:-1]
    if not body:
        raise _Invalid("syntax", "empty address literal")
    tag, colon, rest = body.partition(":")
    if not colon:
        return _ipv4(body)
    if tag.isascii() and tag.lower() == "ipv6":
        return _ipv6(rest)
    if not tag or tag[-1] == "-" or not all(ch in _LDH for ch in tag):
        raise _Invalid("syntax", f"bad address literal tag {tag!r}")
    if not rest or not all("!" <= ch <= "~" and ch not in "[\\]" for ch in rest):
        raise _Invalid("syntax", "bad General-address-literal content")
    raise _Invalid("syntax", f"unsupported address literal tag {tag!r} (IPv4 or IPv6 only)")


def _ipv4(text: str) -> ipaddress.IPv4Address:
    parts = text.split(".")
    if len(parts) != 4:
        raise _Invalid("syntax", f"bad IPv4 address literal {text!r}")
    for part in parts:
        if not 1 <= len(part) <= 3 or not all(ch in _DIGITS for ch in part):
            raise _Invalid("syntax", f"bad IPv4 address literal {text!r}")
        if len(part) > 1 and part[0] == "0":
            raise _Invalid("syntax", f"leading zero in IPv4 address literal {text!r}")
        if int(part) > 255:
            raise _Invalid("syntax", f"IPv4 octet out of range in {text!r}")
    return ipaddress.IPv4Address(text)


def _ipv6(text: str) -> ipaddress.IPv6Address:
    if not text or not all(ch in _HEXDIG or ch in ":." for ch in text):
        raise _Invalid("syntax", f"bad IPv6 address literal {text!r}")
    try:
        ip = ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise _Invalid("syntax", f"bad IPv6 address literal {text!r}") from exc
    if "::" in text:
        # RFC 5321 4.1.3: "::" stands for at least two groups, so at most six are written
        # (an embedded IPv4 address counts as two).
        head, _, tail = text.partition("::")
        pieces = [p for p in head.split(":") + tail.split(":") if p]
        groups = len(pieces) + (1 if pieces and "." in pieces[-1] else 0)
        if groups > 6:
            raise _Invalid("syntax", f"'::' stands for a single group in {text!r}")
    return ip


# --- parameters ------------------------------------------------------------------------------


def _keyword_of(token: str) -> str:
    keyword = token.partition("=")[0]
    return keyword.upper() if keyword.isascii() else keyword


def _parse_params(text: str, *, utf8: bool) -> tuple[tuple[str, str | None], ...]:
    """Parse ``esmtp-param *(SP esmtp-param)``; runs of spaces are tolerated."""
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for token in text.split(" "):
        if not token:
            continue
        keyword, equals, value = token.partition("=")
        # esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
        if not keyword or keyword[0] not in _LET_DIG or not all(c in _LDH for c in keyword):
            raise AddressError(BAD_PARAM, f"bad parameter keyword {keyword!r}")
        key = keyword.upper()
        if key in seen:
            raise AddressError(BAD_PARAM, f"duplicate parameter {key}")
        seen.add(key)
        if not equals:
            params.append((key, None))
            continue
        _check_value(key, value, utf8=utf8)
        params.append((key, value))
    return tuple(params)


def _check_value(key: str, value: str, *, utf8: bool) -> None:
    """esmtp-value = 1*(%d33-60 / %d62-126), plus UTF8-non-ascii under SMTPUTF8 (RFC 6531)."""
    if not value:
        raise AddressError(BAD_PARAM, f"empty value for {key}")
    for ch in value:
        if ch.isascii():
            if not "!" <= ch <= "~" or ch == "=":
                raise AddressError(BAD_PARAM, f"character {ch!r} not allowed in {key} value")
        elif not utf8:
            raise AddressError(BAD_PARAM, f"non-ASCII {key} value without SMTPUTF8")
        elif unicodedata.category(ch) in _BAD_UNQUOTED:
            raise AddressError(BAD_PARAM, f"character {ch!r} not allowed in {key} value")
