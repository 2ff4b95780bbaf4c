"""The ``spamd`` filter: score the message with SpamAssassin's ``spamd`` (SPAMC protocol over TCP
or a unix socket) and import its verdict as symbols, each rule with the score spamd gave it.

One ``REPORT SPAMC/1.5`` request per message (asyncio streams, one connection, closed after the
reply). spamd answers ``Spam: True ; 1000.0 / 5.0`` (spam?, total score, its threshold) and a
report whose table lists every rule that hit with its points. The message is sent as received,
with our own ``Received:`` line on top (client IP, HELO, TLS), so SpamAssassin's relay and
trust-path rules see the real client, as with spamass-milter.

Symbols (``prefix`` default ``SA_``):

* ``SA_<RULE>`` for each rule that hit (upper-cased, characters outside ``A-Z0-9_`` become
  ``_``), option: the points as spamd printed them; imported score = points × ``score_factor``.
* ``SA_SCORE`` always (option ``total/threshold``); imported score = the part of spamd's total
  the rule lines do not account for (the report prints points rounded; a site report template
  without the rule table leaves it all here), so the imported symbols always add up to spamd's
  total × ``score_factor``.
* ``SA_SPAM`` when spamd calls the message spam (option ``total/threshold``); no imported
  score (give it one in ``[scores]``, or use it in a rule).
* ``SA_SKIPPED`` (option ``size N > max_bytes``) instead of all that, for a message larger than
  ``max_bytes``: it is not sent (spamc does the same; a truncated message would be a different,
  broken message, and SpamAssassin's cost grows with size).

Imported scores count only where the policy's ``[scores]`` has no entry for the symbol: a
``[scores]`` line (``SA_GTUBE = 20.0``) always wins. A failure (spamd down, a timeout, a reply
that is not ``EX_OK``, or unparsable) raises: the pipeline adds ``<NAME>_ERROR`` (e.g.
``SPAMD_ERROR``) and applies the filter's ``on_error`` — ``continue`` is the usual choice.

Settings: ``address`` (``HOST:PORT``, ``tcp:HOST:PORT``, ``[v6]:PORT`` or ``unix:/path``; default
``127.0.0.1:783``), ``scan_timeout_s`` (whole exchange; default 8 — keep it under the filter's
``timeout_s``), ``max_bytes`` (default 1048576), ``user`` (sent as the SPAMC ``User:`` header, for
per-user settings in spamd; default none), ``prefix`` (default ``SA_``), ``score_factor``
(multiplies every imported score; default 1.0, 0 imports names only).

``data``: ``score``, ``threshold``, ``spam``, ``rules`` ({rule: points}), or ``skipped``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from filters._imported import imported_symbols, scorer_settings, skipped
from gateway.edits import TraceInfo, received_header
from gateway.filterapi import ConfigError, Filter, FilterContext, Result, Symbol
from gateway.services import Services
from gateway.settings import check_keys, opt_str

SETTINGS = {"address", "scan_timeout_s", "max_bytes", "user", "prefix", "score_factor"}
MAX_REPLY_BYTES = 1024 * 1024
_SPAM_LINE = re.compile(r"^\s*(True|False|Yes|No)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)\s*$", re.I)
# a rule line of the report table: " pts rule name  description" (pts right-aligned, width 4)
_RULE_LINE = re.compile(r"^ {0,3}(-?\d+(?:\.\d+)?) +([A-Za-z0-9_]+)(?: |$)")


class SpamdError(Exception):
    """spamd answered, but not with a usable result."""


def parse_address(value: str, key: str = "address") -> tuple[str, int] | str:
    """``HOST:PORT`` / ``[v6]:PORT`` (``tcp:`` in front is allowed) -> (host, port);
    ``unix:/path`` -> the path."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/"):
            raise ConfigError(key, "unix: needs an absolute path (unix:/run/spamd.sock)")
        return path
    host, sep, port = value.removeprefix("tcp:").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"{value!r} is not HOST:PORT, [v6]:PORT or unix:/path")
    return host, int(port)


async def open_stream(address: tuple[str, int] | str
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(address, str):
        return await asyncio.open_unix_connection(address)
    return await asyncio.open_connection(*address)


async def read_all(reader: asyncio.StreamReader, limit: int) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
        if len(data) > limit:
            raise SpamdError(f"reply longer than {limit} bytes")
    return data


def received_line(ctx: FilterContext, hostname: str) -> bytes:
    rcpt = ctx.recipients[0].addr if len(ctx.recipients) == 1 else None
    proto = "ESMTPS" if ctx.client.tls else "ESMTP"
    return received_header(TraceInfo(hostname, ctx.qid, ctx.client.ip, ctx.client.helo, proto,
                                      rcpt))


def parse_reply(raw: bytes) -> tuple[bool, float, float, list[tuple[str, str]]]:
    """A REPORT reply -> (spam, total, threshold, [(rule, points as printed)])."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise SpamdError("reply without a header block")
    lines = head.decode("utf-8", "replace").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/"):
        raise SpamdError(f"not a spamd reply: {lines[0][:80]!r}")
    if status[1] != "0":
        raise SpamdError(f"spamd said {lines[0][:120]!r}")
    spam_line = next((v for k, _, v in (x.partition(":") for x in lines[1:])
                      if k.strip().lower() == "spam"), None)
    m = _SPAM_LINE.match(spam_line or "")
    if m is None:
        raise SpamdError(f"no usable Spam: header in {head[:200]!r}")
    spam = m[1].lower() in ("true", "yes")
    try:
        total, threshold = float(m[2]), float(m[3])
    except ValueError as e:
        raise SpamdError(f"bad score in Spam: {spam_line!r}") from e
    rules: list[tuple[str, str]] = []
    in_table = False
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("---- "):
            in_table = True
            continue
        if in_table:
            r = _RULE_LINE.match(line)
            if r is not None:
                rules.append((r[2], r[1]))
    return spam, total, threshold, rules


class SpamdFilter(Filter):
    name = "spamd"

    def __init__(self, address: tuple[str, int] | str, timeout_s: float, max_bytes: int,
                 user: str | None, prefix: str, factor: float, hostname: str) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.user = user
        self.prefix = prefix
        self.factor = factor
        self.hostname = hostname

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> SpamdFilter:
        check_keys(cfg, SETTINGS)
        address = parse_address(opt_str(cfg, "address") or "127.0.0.1:783")
        timeout, max_bytes, prefix, factor = scorer_settings(cfg, "SA_", 1024 * 1024)
        user = opt_str(cfg, "user")
        if user is not None and not re.fullmatch(r"[\x21-\x7e]+", user):
            raise ConfigError("user", "must be printable ASCII without spaces")
        return cls(address, timeout, max_bytes, user, prefix, factor, services.hostname)

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        if (too_large := skipped(msg, self.max_bytes, self.prefix)) is not None:
            return too_large
        body = received_line(ctx, self.hostname) + await asyncio.to_thread(msg.path.read_bytes)
        async with asyncio.timeout(self.timeout_s):
            raw = await self._ask(body)
        spam, total, threshold, rules = parse_reply(raw)
        return self._result(spam, total, threshold, rules)

    async def _ask(self, message: bytes) -> bytes:
        head = f"REPORT SPAMC/1.5\r\nContent-length: {len(message)}\r\n"
        if self.user:
            head += f"User: {self.user}\r\n"
        reader, writer = await open_stream(self.address)
        try:
            writer.write(head.encode() + b"\r\n" + message)
            await writer.drain()
            return await read_all(reader, MAX_REPLY_BYTES)
        finally:
            writer.close()

    def _result(self, spam: bool, total: float, threshold: float,
                rules: list[tuple[str, str]]) -> Result:
        summary = f"{total:g}/{threshold:g}"
        symbols = imported_symbols(self.prefix, self.factor,
                                   ((rule, float(pts), (pts,)) for rule, pts in rules),
                                   total, summary, reserved=("SPAM",))
        if spam:
            symbols.append(Symbol(f"{self.prefix}SPAM", (summary,)))
        return Result(symbols=tuple(symbols),
                      data={"score": total, "threshold": threshold, "spam": spam,
                            "rules": {r: float(pts) for r, pts in rules}})
