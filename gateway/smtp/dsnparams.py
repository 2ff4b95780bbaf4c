"""The RFC 3461 DSN parameters of MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT): validate what a
client sends, keep the decoded values for the queue, and encode them again for a downstream that
offers DSN."""

from __future__ import annotations

from gateway.dsn import DsnError, acceptable_text, parse_notify
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
    """``addr-type;address`` with the address xtext-decoded (e.g. ``rfc822;a+b@x.test``)."""
    kind, sep, encoded = (value or "").partition(";")
    if not sep or not kind.replace("-", "").isalnum() or not encoded or len(value or "") > 500:
        return bad("ORCPT")
    try:
        address = xtext_decode(encoded)
    except AddressError:
        return bad("ORCPT")
    if not acceptable_text(address) or address != address.strip():
        return bad("ORCPT")
    return f"{kind.lower()};{address}"


def encode_orcpt(decoded: str) -> str:
    kind, _, address = decoded.partition(";")
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
