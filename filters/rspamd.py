"""The ``rspamd`` filter: score the message with Rspamd's HTTP API (``POST /checkv2``) and import
its result as symbols, each with the score Rspamd gave it, plus its action.

One HTTP/1.1 request per message (asyncio streams, ``Content-Length``, ``Connection: close``)
with the envelope in Rspamd's request headers: ``IP`` (client address), ``Helo``, ``From``
(envelope sender, ``<>`` for bounces), one ``Rcpt`` per recipient, ``Queue-Id`` (our qid) —
so Rspamd's SPF, HFILTER and recipient rules see the real transaction. The reply is JSON:
``score``, ``required_score``, ``action``, ``symbols`` ({name: {score, options}}).

Symbols (``prefix`` default ``RSPAMD_``):

* ``RSPAMD_<NAME>`` for each Rspamd symbol (upper-cased, characters outside ``A-Z0-9_`` become
  ``_``), options: Rspamd's options for it; imported score = its score × ``score_factor``.
* ``RSPAMD_SCORE`` always (option ``score/required_score``); imported score = the part of
  Rspamd's total its symbols do not account for (a prefilter such as GTUBE sets the total and
  the action with symbols that score 0), so the imported symbols add up to Rspamd's total ×
  ``score_factor``.
* ``RSPAMD_ACTION_<ACTION>`` always: Rspamd's action, e.g. ``RSPAMD_ACTION_REJECT``,
  ``RSPAMD_ACTION_ADD_HEADER``, ``RSPAMD_ACTION_SOFT_REJECT``, ``RSPAMD_ACTION_NO_ACTION``; no
  imported score — a policy rule on it makes Rspamd's action ours
  (``if_any = ["RSPAMD_ACTION_REJECT"], action = "reject"``).
* ``RSPAMD_SKIPPED`` (option ``size N > max_bytes``) instead of all that, for a message larger
  than ``max_bytes``: it is not sent.

Imported scores count only where the policy's ``[scores]`` has no entry for the symbol: a
``[scores]`` line always wins. A failure (Rspamd down, a timeout, an HTTP status other than
200, a body that is not the JSON above) raises: the pipeline adds ``<NAME>_ERROR`` (e.g.
``RSPAMD_ERROR``) and applies the filter's ``on_error`` — ``continue`` is the usual choice.

Settings: ``url`` (``http://HOST:PORT[/path]`` of the normal worker; default
``http://127.0.0.1:11333``; plain HTTP only, as Rspamd serves it), ``scan_timeout_s`` (whole
exchange; default 8 — keep it under the filter's ``timeout_s``), ``max_bytes`` (default
10485760), ``prefix`` (default ``RSPAMD_``), ``score_factor`` (multiplies every imported score;
default 1.0, 0 imports names only).

``data``: ``score``, ``required_score``, ``action``, ``symbols`` ({name: score}), or ``skipped``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from filters._imported import imported_symbols, scorer_settings, skipped, symbol_name
from filters.spamd import open_stream, read_all
from gateway.filterapi import ConfigError, Filter, FilterContext, Result, Symbol
from gateway.services import Services
from gateway.settings import check_keys, opt_str

SETTINGS = {"url", "scan_timeout_s", "max_bytes", "prefix", "score_factor"}
MAX_REPLY_BYTES = 4 * 1024 * 1024
MAX_OPTIONS = 5  # options kept per imported symbol


class RspamdError(Exception):
    """Rspamd answered, but not with a usable result."""


def _header_value(value: str) -> str:
    """A request header value without CR/LF (an envelope address cannot inject a header)."""
    return value.replace("\r", " ").replace("\n", " ")


def parse_url(value: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(value)
    try:
        port = u.port or 80
    except ValueError as e:
        raise ConfigError("url", f"{value!r}: bad port") from e
    if u.scheme != "http" or not u.hostname or u.query or u.fragment:
        raise ConfigError("url", f"{value!r} is not http://HOST:PORT[/path]")
    return u.hostname, port, u.path.rstrip("/")


def parse_http(raw: bytes) -> Any:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise RspamdError("HTTP reply without a header block")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/"):
        raise RspamdError(f"not an HTTP reply: {lines[0][:80]!r}")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:])}
    if status[1] != "200":
        raise RspamdError(f"rspamd said {lines[0][:80]!r}: {body[:200]!r}")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RspamdError("chunked reply not supported")
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(body) < n:
            raise RspamdError(f"reply cut short ({len(body)} of {n} bytes)")
        body = body[:n]
    try:
        return json.loads(body)
    except ValueError as e:
        raise RspamdError(f"reply is not JSON: {body[:200]!r}") from e


class RspamdFilter(Filter):
    name = "rspamd"

    def __init__(self, host: str, port: int, path: str, timeout_s: float, max_bytes: int,
                 prefix: str, factor: float) -> None:
        self.host, self.port, self.path = host, port, path
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.prefix = prefix
        self.factor = factor

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> RspamdFilter:
        check_keys(cfg, SETTINGS)
        host, port, path = parse_url(opt_str(cfg, "url") or "http://127.0.0.1:11333")
        timeout, max_bytes, prefix, factor = scorer_settings(cfg, "RSPAMD_", 10 * 1024 * 1024)
        return cls(host, port, path, timeout, max_bytes, prefix, factor)

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        if (too_large := skipped(msg, self.max_bytes, self.prefix)) is not None:
            return too_large
        body = await asyncio.to_thread(msg.path.read_bytes)
        async with asyncio.timeout(self.timeout_s):
            raw = await self._post(self._request_head(ctx, len(body)) + body)
        return self._result(parse_http(raw))

    def _request_head(self, ctx: FilterContext, length: int) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"POST {self.path}/checkv2 HTTP/1.1", f"Host: {host}:{self.port}",
                 f"Content-Length: {length}", "Connection: close",
                 f"IP: {ctx.client.ip}", f"Queue-Id: {ctx.qid}"]
        if ctx.client.helo:
            lines.append(f"Helo: {_header_value(ctx.client.helo)}")
        if ctx.sender is not None:
            lines.append(f"From: {_header_value(ctx.sender.addr) or '<>'}")
        lines += [f"Rcpt: {_header_value(r.addr)}" for r in ctx.recipients]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    async def _post(self, request: bytes) -> bytes:
        reader, writer = await open_stream((self.host, self.port))
        try:
            writer.write(request)
            await writer.drain()
            return await read_all(reader, MAX_REPLY_BYTES)
        finally:
            writer.close()

    def _result(self, reply: Any) -> Result:
        try:
            score = float(reply["score"])
            required = float(reply.get("required_score", 0.0))
            action = str(reply["action"])
            found = reply.get("symbols") or {}
            if not isinstance(found, dict):
                raise TypeError("symbols is not an object")
            entries = [(str(k), float(v.get("score", 0.0)),
                        tuple(str(o) for o in (v.get("options") or ())[:MAX_OPTIONS]))
                       for k, v in found.items()]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RspamdError(f"unexpected reply: {e}") from e
        p = self.prefix
        summary = f"{score:g}/{required:g}"
        symbols = imported_symbols(p, self.factor, entries, score, summary,
                                   reserved=("ACTION_",))
        symbols.append(Symbol(symbol_name(f"{p}ACTION_", action), (summary,)))
        return Result(symbols=tuple(symbols),
                      data={"score": score, "required_score": required, "action": action,
                            "symbols": {name: s for name, s, _ in entries}})
