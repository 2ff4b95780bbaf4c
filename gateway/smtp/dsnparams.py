"""The RFC 3461 DSN parameters of MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT): validate what a
client sends, keep the decoded values for the queue, and encode them again for a downstream that
offers DSN."""

from __future__ import annotations

import re

from gateway.dsn import DsnError, acceptable_text, parse_notify, utf8_addr_xtext
from gateway.replies import Reply
from gateway.smtp.address import AddressError, xtext_decode, xtext_encode

MAX_ENVID = 100  # RFC 3461 4.4: at most 100 characters (encoded)


def bad(what: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad {what} parameter")


def check_ret(value: str | None) -> str | Reply:
    v = (value or "").upper()
    return v if v in ("FULL", "HDRS") else bad("RET")


def check_envid(value: str | None) -> str | Reply:
    """The decoded ENVID, or the reply refusing it."""
    if not value or len(value) > MAX_ENVID:
        return bad("ENVID")
    try:
        decoded = xtext_decode(value)
    except AddressError:
        return bad("ENVID")
    return decoded if acceptable_text(decoded) else bad("ENVID")


def check_notify(value: str | None) -> frozenset[str] | Reply:
    try:
        return parse_notify(value or "")
    except DsnError:
        return bad("NOTIFY")


def check_orcpt(value: str | None) -> str | Reply:
    """``addr-type;address`` with the address decoded (e.g. ``rfc822;a+b@x.test``): xtext
    (RFC 3461), or for the ``utf-8`` type RFC 6533's utf-8-addr-xtext / utf-8-addr-unitext
    (``utf-8;pel\\x{E9}@x.test``, or ``utf-8;pelé@x.test`` in an SMTPUTF8 transaction)."""
    kind, sep, encoded = (value or "").partition(";")
    if not sep or not kind.replace("-", "").isalnum() or not encoded or len(value or "") > 500:
        return bad("ORCPT")
    try:
        address = (utf8_addr_decode(encoded) if kind.lower() == "utf-8"
                   else xtext_decode(encoded))
    except AddressError:
        return bad("ORCPT")
    if not acceptable_text(address) or address != address.strip():
        return bad("ORCPT")
    return f"{kind.lower()};{address}"


# RFC 6533 3: EmbeddedUnicodeChar (\x{HEXPOINT}); a run of RFC 3461 "+XX" hexchars (not in
# the grammar, where "+" is no QCHAR, so unambiguous: taken as UTF-8 octets); any other char
_UTF8_ADDR_TOKEN = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}|((?:\+[0-9A-F]{2})+)|(.)", re.S)


def utf8_addr_decode(encoded: str) -> str:
    """An ORCPT address of type ``utf-8`` decoded: ``\\x{HEX}`` as that code point, QCHAR and
    UTF-8 (utf-8-addr-unitext) as they are, and leniently xtext ``+XX`` runs. Raises
    :class:`AddressError` for ``\\``, ``+`` or ``=`` outside those forms, a space or control,
    a surrogate or a code point past U+10FFFF."""
    out: list[str] = []
    for m in _UTF8_ADDR_TOKEN.finditer(encoded):
        hexpoint, octets, ch = m.groups()
        if hexpoint is not None:
            point = int(hexpoint, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise AddressError(bad("ORCPT"), f"bad code point \\x{{{hexpoint}}}")
            out.append(chr(point))
        elif octets is not None:
            try:
                out.append(bytes.fromhex(octets.replace("+", "")).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise AddressError(bad("ORCPT"), "xtext does not decode to UTF-8") from exc
        elif ch in "+=\\" or (ch.isascii() and not "!" <= ch <= "~"):
            raise AddressError(bad("ORCPT"), f"invalid utf-8-addr-xtext character {ch!r}")
        else:
            out.append(ch)
    return "".join(out)


def encode_orcpt(decoded: str) -> str:
    kind, _, address = decoded.partition(";")
    if kind == "utf-8":  # RFC 6533: utf-8-addr-xtext, whether or not the server has SMTPUTF8
        return f"ORCPT=utf-8;{utf8_addr_xtext(address)}"
    return f"ORCPT={kind};{xtext_encode(address)}"


def mail_dsn_params(ret: str | None, envid: str | None) -> list[str]:
    """MAIL parameters for a downstream that advertises DSN."""
    out = [f"RET={ret}"] if ret else []
    if envid:
        out.append(f"ENVID={xtext_encode(envid)}")
    return out


def rcpt_dsn_params(notify: frozenset[str] | None, orcpt: str | None) -> list[str]:
    out = [f"NOTIFY={','.join(sorted(notify))}"] if notify else []
    if orcpt:
        out.append(encode_orcpt(orcpt))
    return out
