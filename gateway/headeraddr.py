"""The addresses of a header field's value (From, To, Cc, ...), as ``email.utils.getaddresses``
gives them, parsed once per value: the headers, DMARC, rules and Bayes filters each parse the
same From (the stdlib's parser is pure Python, ~20 us a value), and senders repeat from message
to message. Values longer than ``MAX_CACHED`` are parsed each time, so the cache stays small
whatever the headers hold.

:func:`strict_domains`: the domains of an address-list value as the standard library's strict
reader (``email.headerregistry``, the parser of ``email.policy.default``) shows them, and
whether that reading is whole — the second reading DMARC compares ``getaddresses`` with.
:func:`unusable_from`: the From finding the headers filter owns (HEADERS_BAD_FROM)."""

from __future__ import annotations

import email.utils
import functools
from email.headerregistry import HeaderRegistry

MAX_CACHED = 512  # characters
# getaddresses recurses once per nested comment: 3000 levels ended in RecursionError in the
# headers, DMARC, rules and Bayes filters (DMARC's on_error = tempfail then answered 451)
MAX_COMMENT_DEPTH = 50
MAX_STRICT = 4096  # characters: longer values are not read strictly
_REGISTRY = HeaderRegistry()
_Pairs = tuple[tuple[str, str], ...]


def addresses(value: str) -> _Pairs:
    """(display name, address) pairs of one field value, like ``getaddresses([value])``; none
    for a value whose comments nest deeper than ``MAX_COMMENT_DEPTH`` (never parsed)."""
    if value.count("(") > MAX_COMMENT_DEPTH and comment_depth(value) > MAX_COMMENT_DEPTH:
        return ()
    if len(value) > MAX_CACHED:
        return tuple(email.utils.getaddresses([value]))
    return _cached(value)


def unusable_from(value: str) -> bool:
    """True when a From value names no address, or one without a local part or domain (no
    usable author domain): the headers filter's HEADERS_BAD_FROM, which DMARC does not score
    again."""
    addrs = addresses(value)
    return not addrs or not all(usable_mailbox(a) for _, a in addrs)


def usable_mailbox(addr: str) -> bool:
    """An address with a local part and a domain (what DMARC needs of every From address)."""
    local, at, domain = addr.rpartition("@")
    return bool(at and local and domain.strip().rstrip("."))


def comment_depth(value: str) -> int:
    """How deep RFC 5322 comments nest in ``value`` (quoted strings and quoted pairs
    respected): what the stdlib's recursive parsers would recurse."""
    depth = deepest = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")" and depth:
            depth -= 1
    return deepest


@functools.lru_cache(maxsize=1024)
def _cached(value: str) -> _Pairs:
    return tuple(email.utils.getaddresses([value]))


def strict_domains(value: str) -> tuple[tuple[str, ...], bool]:
    """The domains (lower case, no trailing dot, in order, each once) of the addresses the
    strict reader finds in an address-list value, and whether its reading is whole: at least
    one address, every one with a local part and a domain, no failure. Its defect notes are
    not refusals (an encoded-word without the space after it is common and harmless): where
    it dropped text as invalid, ``getaddresses`` reads that text too, and DMARC compares the
    two readings. Values over ``MAX_STRICT`` characters or with comments nested deeper than
    ``MAX_COMMENT_DEPTH`` are not read: ``((), False)``."""
    if len(value) > MAX_STRICT or value.count("(") > MAX_COMMENT_DEPTH and \
            comment_depth(value) > MAX_COMMENT_DEPTH:
        return (), False
    if len(value) > MAX_CACHED:
        return _strict(value)
    return _strict_cached(value)


@functools.lru_cache(maxsize=1024)
def _strict_cached(value: str) -> tuple[tuple[str, ...], bool]:
    return _strict(value)


def _strict(value: str) -> tuple[tuple[str, ...], bool]:
    try:
        addrs = _REGISTRY("From", value).addresses  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the stdlib's parser gave up: no strict reading
        return (), False
    out: list[str] = []
    whole = bool(addrs)
    for a in addrs:
        dom = a.domain.strip().rstrip(".").lower()
        if not a.username or not dom:
            whole = False
        elif dom not in out:
            out.append(dom)
    return tuple(out), whole
