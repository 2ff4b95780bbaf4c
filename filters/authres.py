"""The ``authres`` filter: one RFC 8601 Authentication-Results header summing up the ``spf``,
``dkim`` and ``dmarc`` filters' results, built with the ``authres`` library, and removal of
any Authentication-Results header the message arrived with that carries our authserv-id
(RFC 8601 §5: such a header is forged or stale).

Reported methods: ``spf`` (``smtp.mailfrom`` or ``smtp.helo``, per the identity checked),
``dkim`` (one result per signature, with ``header.d``, ``header.s``, ``header.a``; ``dkim=none``
without a signature), ``dmarc`` (``header.from`` and ``policy.dmarc`` when a record applied; an
override by a trusted ARC sealer is noted in a comment), ``arc`` (RFC 8617 §10.1: ``pass``,
``fail`` or ``none``; left out when the chain check was a temperror or skipped by policy).

Settings: ``authserv_id`` (default: the gateway hostname, ``Services.hostname``); ``methods``
(list, subset of ``spf``/``dkim``/``dmarc``/``arc``). Without ``methods`` the header reports
every one of them whose filter is in the chain (``after``: it waits for those); with
``methods`` the listed filters are ``requires``, so the loader refuses a chain that lacks one.
A method whose filter failed or timed out (``on_error = "continue"``) is reported as
``temperror`` (spf, dkim, dmarc; ``arc`` has no such result in RFC 8617 and is left out);
one whose result is missing is left out.

Removal (RFC 8601 §5): each Authentication-Results value is read with the ``authres``
library's grammar (:mod:`filters._arheader`: comments, nested comments, quoted strings,
folding and the version as the library reads them); one whose authserv-id is ours, in any
case (RFC 8601 §2.5), is removed. A value the library cannot parse (or too long or too deeply
nested to parse, or beyond the message's ``PARSE_BUDGET``) is removed when our authserv-id
occurs in it anywhere as a token, comments included: fail closed, so no reader downstream can
take it for ours. A value with RFC 2047 encoded words is also read as a reader decoding them
shows it (the stdlib's ``email.policy.default`` does, in any unstructured field): removed when
that reading carries our authserv-id (``=?us-ascii?q?mx.example?=; dkim=pass``); such a value
longer than ``_arheader.MAX_VALUE`` is removed undecoded. The core's
``RemoveHeader.value_prefix`` compares case-sensitively, so one ``RemoveHeader`` is emitted per
matching header, with that header's own (unfolded) value as the prefix.
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Mapping
from typing import Any

import authres
import authres.arc
import authres.dmarc

from filters import _arheader
from gateway.filterapi import (
    AddHeader,
    ConfigError,
    Edit,
    Filter,
    FilterContext,
    RemoveHeader,
    Result,
)
from gateway.message import Message
from gateway.services import Services
from gateway.settings import check_keys, opt_str, str_list

HEADER = "Authentication-Results"
PARSE_BUDGET = 16384  # characters of incoming values naming our authserv-id parsed per message
METHODS = ("spf", "dkim", "dmarc", "arc")
_AUTHSERV = re.compile(r"[^\s;()]+")
_PVALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value as the ``authres`` library reads
    it (lower case), or None when the library cannot parse the value."""
    parsed = _arheader.parse(value)
    return parsed.authserv_id if parsed is not None else None


def carries(value: str, authserv_id: str) -> bool:
    """Whether an Authentication-Results value must be treated as carrying ``authserv_id``:
    the library reads that authserv-id, or it cannot parse the value and the value names
    ``authserv_id`` anywhere (fail closed)."""
    if not _arheader.mentions(value, authserv_id):
        return False  # the library could not read it as ours: no need to parse
    found = authserv_id_of(value)
    return found is None or found == authserv_id.lower()


def decoded(value: str) -> str | None:
    """The value as a reader that decodes RFC 2047 encoded words shows it (the stdlib's
    ``email.policy.default``), when that differs from the value; ``""`` for a value too long
    to decode (fail closed: the caller removes it); None when there is nothing to decode."""
    if "=?" not in value:
        return None
    if len(value) > _arheader.MAX_VALUE:
        return ""
    try:
        text = str(email.policy.default.header_factory(HEADER, value))
    except Exception:  # noqa: BLE001 - a value the stdlib cannot decode shows as it is
        return None
    return text if text != value else None


def forged(message: Message | None, authserv_id: str) -> tuple[RemoveHeader, ...]:
    """RemoveHeader edits for every Authentication-Results carrying ``authserv_id``, as
    written or RFC 2047 decoded. At most ``PARSE_BUDGET`` characters of values naming it are
    parsed per message (the filter runs on the event loop); beyond that, a value naming it is
    removed unparsed (fail closed)."""
    if message is None:
        return ()
    out: list[RemoveHeader] = []
    budget = PARSE_BUDGET
    for value in message.get_all(HEADER):
        shown = decoded(value)
        if not _arheader.mentions(value, authserv_id) and not (
                shown == "" or shown and _arheader.mentions(shown, authserv_id)):
            continue
        over = len(value) > budget
        budget -= min(len(value), budget)
        if over or shown == "" or carries(value, authserv_id) or \
                (shown is not None and carries(shown, authserv_id)):
            edit = RemoveHeader(HEADER, value_prefix=value)
            if edit not in out:
                out.append(edit)
    return tuple(out)


class AuthResultsFilter(Filter):
    name = "authres"
    local = True  # no DNS, no sockets: runs in its stage's coroutine
    after = METHODS

    def __init__(self, authserv_id: str, methods: tuple[str, ...] = METHODS,
                 required: bool = False) -> None:
        self.authserv_id = authserv_id
        self.methods = methods
        self.requires = methods if required else ()  # type: ignore[misc]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> AuthResultsFilter:
        check_keys(cfg, {"authserv_id", "methods"})
        authserv_id = opt_str(cfg, "authserv_id") or services.hostname
        if not _AUTHSERV.fullmatch(authserv_id) or \
                authserv_id_of(f"{authserv_id}; none") != authserv_id.lower():
            raise ConfigError("authserv_id", "must be one dot-atom token (RFC 8601: no "
                                             "spaces, ';', '()' or '@')")
        methods = str_list(cfg, "methods") if "methods" in cfg else METHODS
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ConfigError("methods", f"unknown method(s) {', '.join(bad)}; "
                                         f"known: {', '.join(METHODS)}")
        return cls(authserv_id, tuple(dict.fromkeys(methods)), required="methods" in cfg)

    async def on_message(self, ctx: FilterContext) -> Result:
        edits: list[Edit] = list(forged(ctx.message, self.authserv_id))
        edits.append(AddHeader(HEADER, self.header_value(ctx)))
        # the arc filter seals only when this ran for the message, with its authserv-id
        return Result(edits=tuple(edits), data={"authserv_id": self.authserv_id})

    def header_value(self, ctx: FilterContext) -> str:
        results: list[Any] = []
        if "spf" in self.methods:
            results.extend(_spf(ctx))
        if "dkim" in self.methods:
            results.extend(_dkim(ctx))
        if "dmarc" in self.methods:
            results.extend(_dmarc(ctx))
        if "arc" in self.methods:
            results.extend(_arc(ctx))
        header = authres.AuthenticationResultsHeader(authserv_id=self.authserv_id,
                                                     results=results)
        text = str(header)
        prefix = f"{HEADER}: "
        return text[len(prefix):] if text.startswith(prefix) else text


def _failed(res: Any) -> bool:
    """The filter ran but failed or timed out (its ``<NAME>_ERROR`` result, no data)."""
    return not res.data and any(s.name.endswith("_ERROR") for s in res.symbols)


def _spf(ctx: FilterContext) -> list[Any]:
    res = ctx.results.get("spf")
    if res is not None and _failed(res):  # a check we could not finish: temperror
        return [authres.SPFAuthenticationResult(result="temperror")]
    if res is None or "result" not in res.data:
        return []
    data = res.data
    domain = _token(data.get("domain")) or ""
    if data.get("identity") == "helo":
        return [authres.SPFAuthenticationResult(result=data["result"],
                                                smtp_helo=domain or None)]
    mailfrom = domain
    sender = ctx.sender
    if sender is not None and domain and sender.local and not sender.quoted \
            and re.fullmatch(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", sender.local):
        mailfrom = f"{sender.local}@{domain}"
    return [authres.SPFAuthenticationResult(result=data["result"],
                                            smtp_mailfrom=mailfrom or None)]


def _dkim(ctx: FilterContext) -> list[Any]:
    res = ctx.results.get("dkim")
    if res is None:
        return []
    if _failed(res):
        return [authres.DKIMAuthenticationResult(result="temperror")]
    sigs = res.data.get("signatures")
    if not sigs:
        return [authres.DKIMAuthenticationResult(result="none")]
    return [authres.DKIMAuthenticationResult(result=sig.get("result") or "permerror",
                                             header_d=_token(sig.get("d")),
                                             header_s=_token(sig.get("s")),
                                             header_a=_token(sig.get("a")))
            for sig in sigs]


def _token(value: Any) -> str | None:
    """A property value as an RFC 8601 token, or None (left out) for anything else."""
    text = str(value or "")
    return text if _PVALUE.fullmatch(text) else None


def _dmarc(ctx: FilterContext) -> list[Any]:
    res = ctx.results.get("dmarc")
    if res is not None and _failed(res):
        return [authres.dmarc.DMARCAuthenticationResult(result="temperror")]
    if res is None or "result" not in res.data:
        return []
    data = res.data
    policy = data.get("policy") if data.get("record") else None
    override = data.get("arc_override")
    return [authres.dmarc.DMARCAuthenticationResult(
        result=data["result"], header_from=_token(data.get("domain")), policy=_token(policy),
        result_comment=f"overridden: ARC sealed by trusted {override}" if override else None)]


def _arc(ctx: FilterContext) -> list[Any]:
    res = ctx.results.get("arc")
    result = res.data.get("result") if res is not None else None
    if result not in ("pass", "fail", "none"):
        return []
    return [authres.arc.ARCAuthenticationResult(result=result)]
