"""The connection plumbing the SMTP session (gateway/smtp/server.py) stands on, and the check
that aiosmtpd's still fits it.

The session replaces aiosmtpd's command loop: it overrides ``SMTP._handle_client`` (which
aiosmtpd's ``connection_made`` starts as a task) and ``_timeout_cb`` (the timer aiosmtpd arms),
reads ``_reader``/``_writer`` (set by aiosmtpd's stream callback) and ``_handler_coroutine``,
and answers aiosmtpd's ``__init__`` an empty ``dir()``. :func:`check_client_loop` verifies, before
the first connection, that aiosmtpd still calls and sets those (patch ``aiosmtpd.client-loop``,
gateway/patches.py). When it does not, the session runs on :class:`StreamBase` instead: the same
few members, built on asyncio's ``StreamReaderProtocol`` alone, without STARTTLS (its transport
switch is aiosmtpd's); one warning line says so. aiosmtpd's own command loop is never the
fallback: it would apply none of the policy.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway import patches

# (aiosmtpd function, names its code must use): the hooks the session relies on
_HOOKS = (
    ("connection_made", ("_handle_client", "_handler_coroutine", "_reset_timeout")),
    ("_reset_timeout", ("_timeout_cb",)),
    ("_cb_client_connected", ("_reader", "_writer")),
    ("connection_lost", ("_handler_coroutine", "_timeout_handle")),
    ("__init__", ("_handler_coroutine", "_cb_client_connected")),
)
_INIT_KEYWORDS = ("hostname", "tls_context", "data_size_limit", "enable_SMTPUTF8", "timeout",
                  "loop")


def check_client_loop() -> str | None:
    """None when aiosmtpd's ``SMTP`` still starts ``_handle_client``, arms ``_timeout_cb``, sets
    ``_reader``/``_writer`` and takes the keywords the session passes; else why not."""
    for fn_name, names in _HOOKS:
        fn = getattr(SMTP, fn_name, None)
        for name in names:
            if not patches.calls(fn, name):
                return f"aiosmtpd's SMTP.{fn_name} no longer uses {name}"
    params = inspect.signature(SMTP.__init__).parameters
    missing = [k for k in _INIT_KEYWORDS if k not in params]
    if missing:
        return f"aiosmtpd's SMTP() no longer takes {', '.join(missing)}"
    if not patches.calls(asyncio.StreamReaderProtocol.__init__, "_client_connected_cb"):
        return "asyncio.StreamReaderProtocol has no _client_connected_cb"
    return None


@dataclass
class _Session:
    """What the session reads of aiosmtpd's ``Session``."""

    peer: Any
    ssl: Any = None


class StreamBase(asyncio.StreamReaderProtocol):
    """The members of aiosmtpd's ``SMTP`` that the session uses, on asyncio's streams alone:
    ``loop``, ``hostname``, ``tls_context`` (always None: no STARTTLS), ``session.peer``,
    ``transport``, ``_reader``/``_writer``, ``_handler_coroutine`` (``_handle_client``, started
    at connection), and ``_timeout_cb`` armed once for ``timeout`` seconds."""

    line_length_limit = 1001

    def __init__(self, handler: Any, *, hostname: str | None, tls_context: Any, timeout: float,
                 loop: asyncio.AbstractEventLoop, **ignored: Any) -> None:
        self.loop = loop
        self.hostname = hostname or "localhost"
        self.tls_context = None
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self.session: _Session | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._reader = asyncio.StreamReader(limit=self.line_length_limit, loop=loop)
        self._writer: asyncio.StreamWriter | None = None
        super().__init__(self._reader, client_connected_cb=self._streams, loop=loop)

    def _streams(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session = _Session(transport.get_extra_info("peername"))
        super().connection_made(transport)  # makes the writer (``_streams``) at once
        self.transport = transport
        self._timeout_handle = self.loop.call_later(self._timeout_duration, self._timeout_cb)
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        super().connection_lost(exc)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self.transport = None

    def _timeout_cb(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _handle_client(self) -> None:
        raise NotImplementedError  # the session's


CLIENT_LOOP = patches.install("aiosmtpd.client-loop", check_client_loop)
