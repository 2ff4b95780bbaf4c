"""The hardened SMTP front end: an aiosmtpd ``SMTP`` subclass that owns the protocol.

aiosmtpd provides the connection plumbing and the STARTTLS transport switch (which discards
plaintext pipelined after STARTTLS). This class replaces its command loop and command handlers
to close aiosmtpd 1.4.6's gaps: every reply carries an enhanced status code; exception text never
reaches the client (``451 4.3.0 ... (qid)``, the detail goes to the log); DATA is read in blocks
straight into a spool file, ends only at CRLF.CRLF and refuses (or normalizes) bare CR/LF; each
wait has its own deadline (idle, per command, per DATA block, whole DATA); every limit is a
policy setting. Policy decisions are the engine's (gateway/engine.py).

STARTTLS switches the transport as aiosmtpd's own ``smtp_STARTTLS`` does, through asyncio's
private ``sslproto.SSLProtocol`` and aiosmtpd's ``connection_made``; both are checked before
the first connection (patch ``asyncio.sslproto.starttls``, gateway/patches.py). When they are
not as expected, STARTTLS is not offered (mail still flows, in plaintext) and one warning says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, TLSSetupException, sslproto

from gateway import patches
from gateway import replies as R
from gateway.deadline import Deadline
from gateway.engine import SessionState, Transaction
from gateway.logs import event
from gateway.message import HeadCapture
from gateway.qid import new_qid, new_session_id
from gateway.replies import Reply
from gateway.smtp import dsnparams
from gateway.smtp.address import AddressError, parse_mail_from, parse_rcpt_to
from gateway.smtp.datareader import DataEOF, DataStatus, DataTimeout, DataTooSlow, read_data
from gateway.smtp.plumbing import CLIENT_LOOP, StreamBase
from gateway.spares import SpareFiles

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP as _Base  # what the session's members come from

    from gateway.app import Runtime
else:
    _Base = object  # the plumbing comes second in the concrete classes' bases

log = logging.getLogger("mailgate.smtp")
READ_BUFFER_BYTES = 64 * 1024  # per connection; the reader pauses the socket at twice this
# DATA arrives in blocks of up to 64 KiB, written as they come; smaller ones are gathered here.
# Each session in DATA holds one: 64 KiB cost 3 MB of peak RSS at 200 sessions, this ~0.
SPOOL_BUFFER_BYTES = 8 * 1024
SIZE_RE = re.compile(r"[0-9]{1,20}")
HELO_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no space (RFC 5321 4.1.1.1)
CLIENT_ERROR_CODES = {500, 501, 502, 503, 504, 555}


def check_starttls_switch() -> str | None:
    """None when asyncio's ``SSLProtocol`` and aiosmtpd's ``connection_made`` still offer what
    ``cmd_starttls`` uses (the constructor's arguments, ``_app_transport``, ``_extra``; the
    STARTTLS branch that moves the streams and drops pipelined plaintext); else why not."""
    params = list(inspect.signature(sslproto.SSLProtocol).parameters)
    if params[:4] != ["loop", "app_protocol", "sslcontext", "waiter"] or "server_side" not in params:
        return f"asyncio.sslproto.SSLProtocol takes ({', '.join(params)})"
    for name in ("_original_transport", "_tls_protocol", "_buffer", "_extra", "_transport"):
        if not patches.calls(SMTP.connection_made, name):
            return f"aiosmtpd's connection_made no longer uses {name} for STARTTLS"
    loop = asyncio.new_event_loop()  # never run: the protocol is only built and inspected
    try:
        waiter = loop.create_future()
        proto = sslproto.SSLProtocol(loop, asyncio.Protocol(),
                                     ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), waiter,
                                     server_side=True)
        app = getattr(proto, "_app_transport", None)
        extra = getattr(proto, "_extra", None)
        proto.connection_lost(None)  # closes the app transport, as asyncio does
        if app is None or app.get_extra_info("sslcontext") is None:
            return "asyncio.sslproto.SSLProtocol has no _app_transport"
        if not isinstance(extra, dict):
            return "asyncio.sslproto.SSLProtocol has no _extra mapping"
    finally:
        loop.close()
    return None


STARTTLS_SWITCH = patches.install("asyncio.sslproto.starttls", check_starttls_switch)


class _NoHooks:
    """aiosmtpd wants a handler object; all behaviour lives in SmtpServer."""

    def __dir__(self) -> list[str]:
        return []  # no handle_*/auth_* hooks for aiosmtpd's __init__ to collect (see below)


class SmtpSession(_Base):
    """The SMTP session; it runs on aiosmtpd's plumbing (:class:`SmtpServer`) or, when that is
    not as expected, on asyncio's streams (``StreamSmtpServer``, gateway/smtp/plumbing.py)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine  # fixed for the connection's life (reloads: new ones)
        self.policy = self.engine.policy
        self.limits = self.policy.limits
        self.line_length_limit = READ_BUFFER_BYTES  # StreamReader buffer; lengths checked here
        super().__init__(_NoHooks(), hostname=self.policy.hostname,
                         tls_context=runtime.tls_context if STARTTLS_SWITCH else None,
                         data_size_limit=self.limits.max_message_bytes, enable_SMTPUTF8=True,
                         timeout=self.limits.max_session_s,
                         loop=asyncio.get_running_loop())
        self.state: SessionState | None = None
        self.txn: Transaction | None = None
        self.idle = False
        self._idle_since: float | None = None  # loop.time() a command read began waiting
        self._idle_timer: asyncio.TimerHandle | None = None
        self._budget = Deadline()  # command budgets and DATA's reads: one timer per session
        self.closing = False
        self.invalid = 0
        self.refused_rcpts = 0
        self.commands = 0
        self.refused_greeting = False
        self.end_reason = "eof"
        self.started = time.monotonic()

    # -- plumbing ---------------------------------------------------------------------------
    def __dir__(self) -> list[str]:
        """Nothing for aiosmtpd's ``__init__`` to collect: on every connection it walks
        ``dir(self)`` (``inspect.getmembers``: a getattr per attribute, ~10% of the CPU per
        message in proxy mode) to build its smtp_*/auth_* dispatch tables, which this class
        never uses — commands go through ``COMMANDS``, AUTH is not offered."""
        return []

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        # Break the session's reference cycles (protocol <-> its StreamWriter, the bound
        # callback asyncio keeps) once the handler is done, so refcounting frees the session,
        # its socket and its buffers at once. Left to the cyclic collector, ended sessions
        # piled up in its old generation: at 200 sessions, 400 dead ones and ~10 MB of RSS.
        self._client_connected_cb = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._budget.close()
        if self._handler_coroutine is not None:  # done already: the callback runs next turn
            self._handler_coroutine.add_done_callback(self._drop_writer)

    def _drop_writer(self, task: asyncio.Task[None]) -> None:
        self._writer = None  # type: ignore[assignment]

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF, dropping commands still buffered; instead let
        # the reader see EOF after the buffered commands, and answer them first.
        if self._reader is not None:
            self._reader.feed_eof()
        return False if self.session is not None and self.session.ssl is not None else True

    def _timeout_cb(self) -> None:
        # aiosmtpd's timer, armed once per connection: limits.max_session_s
        sid = self.state.sid if self.state else "-"
        self.runtime.background(self.close_with(
            Reply(421, "4.4.2", f"Session too long, closing connection ({sid})"), "max-session"))

    async def push(self, status: Any) -> None:
        data = status.encode("utf-8") if isinstance(status, str) else status
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(data + b"\r\n")
        transport = self._writer.transport  # self.transport's typed view (after STARTTLS too)
        if transport.get_write_buffer_size() == 0 and not transport.is_closing():
            return  # the kernel took it all: nothing to wait for (drain would return at once)
        async with asyncio.timeout(self.limits.idle_timeout_s):
            await self._writer.drain()

    async def reply(self, reply: Reply) -> None:
        await self.push(reply.render())
        if reply.code in CLIENT_ERROR_CODES:
            self.invalid += 1
            if self.invalid >= self.limits.max_invalid_commands:
                await self.close_with(Reply(421, "4.7.0", "Too many errors, closing connection"),
                                      "too-many-errors")

    async def close_with(self, reply: Reply, reason: str) -> None:
        """Say ``reply`` (a session-level 421, ending with the session ID) and close."""
        sid = self.state.sid if self.state else None
        if sid and reply.code >= 400 and not reply.text.endswith(")"):
            reply = reply.with_qid(sid)
        await self._close_with(reply, reason)

    async def _close_with(self, reply: Reply, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self.end_reason = reason
            with contextlib.suppress(Exception):
                await self.push(reply.render())
        if self.transport is not None:
            self.transport.close()

    # -- the session --------------------------------------------------------------------------
    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session else None
        ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) else ("unknown", 0)
        st = self.state = SessionState(new_session_id(), ip, port, self.policy.is_trusted(ip))
        conns = self.runtime.connections
        admitted = conns.admit(ip, self.limits)
        self.runtime.sessions.add(self)
        try:
            if admitted is not None:
                await self.close_with(admitted, "connection-limit")
                return
            async with self._budget(self.limits.command_timeout_s):
                refusal = await self.engine.on_connect(st)
            if refusal is not None and refusal.code == 421:
                await self.close_with(refusal, "refused")
                return
            if refusal is not None:
                self.refused_greeting = True
                await self.push(refusal.render())
            else:
                await self.push(f"220 {self.hostname} ESMTP mailgate")
            while self.transport is not None and not self.closing:
                if self.runtime.draining and self.txn is None:
                    await self.close_with(R.SHUTDOWN, "shutdown")
                    break
                line = await self._read_command()
                if line is None:
                    break
                await self._dispatch(line)
        except asyncio.CancelledError:
            self.end_reason = "lost" if self.end_reason == "eof" else self.end_reason
            raise
        except (ConnectionError, TLSSetupException) as e:
            self.end_reason = f"lost: {type(e).__name__}"
        except Exception:
            qid = self.txn.qid if self.txn else st.sid
            log.exception("internal error in session %s (qid %s)", st.sid, qid)
            await self.close_with(R.INTERNAL.with_qid(qid), "internal-error")
        finally:
            if admitted is None:
                conns.release(ip)
            self.runtime.session_ended(self)
            self._end_transaction(None, "aborted")
            if self.transport is not None:
                self.transport.close()
            event(log, "connection", sid=st.sid, worker=self.runtime.worker, client=ip, port=port,
                  helo=st.helo,
                  tls=st.tls, transactions=st.transactions, accepted=st.accepted,
                  refused=st.refused, commands=self.commands, invalid=self.invalid,
                  end=self.end_reason, ms=round((time.monotonic() - self.started) * 1000, 1))

    async def _read_command(self) -> bytes | None:
        self.idle = True
        self._idle_since = since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_at(since + self.limits.idle_timeout_s,
                                                 self._idle_check)
        try:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await self._discard_long_line()
                return b""  # marks "too long"
        except asyncio.IncompleteReadError:
            return None
        finally:
            self.idle = False
            self._idle_since = None
        if len(line) > self.limits.max_command_line_bytes:
            return b""
        return line

    def _idle_check(self) -> None:
        """The deadline of a command read (limits.idle_timeout_s): one timer per session that
        re-arms itself for the read under way, rather than a timeout scope (a timer pushed and
        cancelled) around each read. Past it: 421, and closing the connection ends the read."""
        self._idle_timer = None
        if self.transport is None or self.closing:
            return
        limit, now, since = self.limits.idle_timeout_s, self.loop.time(), self._idle_since
        if since is not None and now - since >= limit:
            self.runtime.background(self._idle_expired())
            return
        self._idle_timer = self.loop.call_at((now if since is None else since) + limit,
                                             self._idle_check)

    async def _idle_expired(self) -> None:
        await self.close_with(R.TIMEOUT, "idle-timeout")
        self._reader.feed_eof()  # the read ends now, even while the 421 waits for the client

    async def _discard_long_line(self) -> None:
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.readexactly(e.consumed)

    async def _dispatch(self, raw: bytes) -> None:
        self.commands += 1
        if raw == b"":
            await self.reply(R.LINE_TOO_LONG)
            return
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if b"\r" in line or b"\0" in line:
            await self.reply(Reply(500, "5.5.2", "Syntax error: CR or NUL in command"))
            return
        verb_b, _, arg_b = line.partition(b" ")
        try:
            verb = verb_b.decode("ascii").upper()
        except UnicodeDecodeError:
            await self.reply(R.SYNTAX)
            return
        arg = arg_b.decode("utf-8", "surrogateescape").strip()
        if self.refused_greeting and verb != "QUIT":
            await self.reply(Reply(503, "5.5.1", "Service refused, only QUIT is accepted"))
            return
        handler = COMMANDS.get(verb)
        if handler is None:
            await self.reply(R.SYNTAX)
            return
        if verb == "DATA":  # DATA has its own deadlines (blocks, whole transfer, relay)
            await handler(self, arg)
            return
        try:
            async with self._budget(budget := self.engine.command_budget_s(verb)):
                await handler(self, arg)
        except TimeoutError:
            qid = self.txn.qid if self.txn else (self.state.sid if self.state else "-")
            log.error("command %s exceeded its %ss budget (qid %s)", verb, budget, qid)
            await self.close_with(Reply(421, "4.4.2", f"Timeout processing command ({qid})"),
                                  "command-timeout")

    # -- commands ------------------------------------------------------------------------------
    async def cmd_helo(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def cmd_ehlo(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def _hello(self, arg: str, *, esmtp: bool) -> None:
        st = self.state
        assert st is not None
        if not HELO_RE.fullmatch(arg):
            await self.reply(Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} "
                                                 "hostname"))
            return
        self._end_transaction(None, "aborted")
        st.helo, st.esmtp = arg, esmtp
        await self.engine.on_helo(st)
        if not esmtp:
            await self.push(f"250 {self.hostname}")
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.limits.max_message_bytes}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        if self.tls_context is not None and not st.tls:
            lines.append("STARTTLS")
        await self.push("\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}")

    async def cmd_mail(self, arg: str) -> None:
        st = self.state
        assert st is not None
        if st.helo is None:
            await self.reply(Reply(503, "5.5.1", "Send HELO/EHLO first"))
            return
        if self.txn is not None:
            await self.reply(Reply(503, "5.5.1", "Nested MAIL command"))
            return
        if st.transactions >= self.limits.max_transactions_per_connection:
            await self.close_with(Reply(421, "4.7.0", "Too many transactions, reconnect"),
                                  "too-many-transactions")
            return
        if self.runtime.draining:
            await self.close_with(R.SHUTDOWN, "shutdown")
            return
        try:
            if not arg.upper().startswith("FROM:"):
                raise AddressError(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            path = parse_mail_from(arg, smtputf8_enabled=st.esmtp)
        except AddressError as e:
            await self.reply(e.reply)
            return
        qid = new_qid()
        params, problem = self._mail_params(path.params, st.esmtp, qid)
        if problem is not None:
            await self.reply(problem)
            return
        ret = next((p[4:] for p in params if p.startswith("RET=")), None)
        envid = next((p[6:] for p in params if p.startswith("ENVID=")), None)
        txn = Transaction(qid, path.address,
                          [p for p in params if not p.startswith(("RET=", "ENVID="))],
                          ret=ret, envid=envid,
                          utf8=any(p.upper() == "SMTPUTF8" for p in params))
        reply = await self.engine.on_mail(st, txn)
        if reply.is_ok:
            self.txn = txn
        else:
            self.engine.log_transaction(st, txn, reply, "refused")
        await self.reply(reply)

    def _mail_params(self, params: Any, esmtp: bool, qid: str
                     ) -> tuple[list[str], Reply | None]:
        out: list[str] = []
        for key, value in params:
            k = key.upper()
            if not esmtp:
                return out, Reply(501, "5.5.4", "Parameters need EHLO")
            if k == "SIZE":
                if value is None or not SIZE_RE.fullmatch(value):
                    return out, Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.limits.max_message_bytes:
                    return out, Reply(552, "5.3.4", "Message size exceeds fixed limit of "
                                                    f"{self.limits.max_message_bytes} bytes "
                                                    f"({qid})")
                out.append(f"SIZE={value}")
            elif k == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return out, Reply(555, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                out.append(f"BODY={value.upper() if value else ''}")
            elif k == "SMTPUTF8":
                if value is not None:
                    return out, Reply(501, "5.5.4", "SMTPUTF8 takes no value")
                out.append("SMTPUTF8")
            elif k == "RET":
                ret = dsnparams.check_ret(value)
                if isinstance(ret, Reply):
                    return out, ret
                out.append(f"RET={ret}")
            elif k == "ENVID":
                envid = dsnparams.check_envid(value)
                if isinstance(envid, Reply):
                    return out, envid
                out.append(f"ENVID={envid}")  # decoded; encoded again for a downstream
            else:
                return out, Reply(555, "5.5.4", f"Unsupported MAIL parameter {k}")
        return out, None

    async def cmd_rcpt(self, arg: str) -> None:
        st, txn = self.state, self.txn
        assert st is not None
        if txn is None:
            await self.reply(Reply(503, "5.5.1", "Need MAIL command"))
            return
        try:
            if not arg.upper().startswith("TO:"):
                raise AddressError(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            path = parse_rcpt_to(arg, smtputf8_ok=txn.utf8)
        except AddressError as e:
            await self.reply(e.reply)
            return
        notify: frozenset[str] | None = None
        orcpt: str | None = None
        for key, value in path.params:
            k = key.upper()
            checked: object
            if k == "NOTIFY":
                checked = notify = dsnparams.check_notify(value)  # type: ignore[assignment]
            elif k == "ORCPT":
                checked = orcpt = dsnparams.check_orcpt(value)  # type: ignore[assignment]
            else:
                checked = Reply(555, "5.5.4", f"Unsupported RCPT parameter {k}")
            if isinstance(checked, Reply):
                await self.reply(checked)
                return
        reply = await self.engine.on_rcpt(st, txn, path.address, notify, orcpt)
        await self.reply(reply)
        if not reply.is_ok and reply.status != "4.5.3":  # a class/transport split is no fault
            self.refused_rcpts += 1
            if self.refused_rcpts >= self.limits.max_refused_recipients:
                await self.close_with(Reply(421, "4.7.0", "Too many refused recipients, closing "
                                                          "connection"), "too-many-refused-rcpts")

    async def cmd_data(self, arg: str) -> None:
        st, txn = self.state, self.txn
        assert st is not None
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if txn is None:
            await self.reply(Reply(503, "5.5.1", "Need MAIL command"))
            return
        if not txn.rcpts:  # RFC 5321 3.3 allows 503 or 554 for both cases
            if txn.rcpt_refused:
                await self.reply(Reply(554, "5.5.1", "No valid recipients"))
            else:
                await self.reply(Reply(503, "5.5.1", "Need RCPT command"))
            return
        spares = self.runtime.spool.spares
        spool = self.runtime.incoming_dir / f"{txn.qid}.tmp"
        f: _open_spool | None = None
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            loop = asyncio.get_running_loop()
            # queue mode: the file stays open for the commit (see Spool.commit_async)
            with _open_spool(spool, spares, keep_open=self.engine.queue_mode) as f:
                outcome = await read_data(
                    self._reader, f.write, max_message_bytes=self.limits.max_message_bytes,
                    max_line_bytes=self.limits.max_line_bytes - 2,
                    bare_newline=self.limits.bare_lf,
                    idle_timeout_s=self.limits.data_block_timeout_s,
                    deadline=loop.time() + self.limits.data_timeout_s, scope=self._budget,
                    min_rate_bytes_per_s=self.limits.min_data_rate_bytes_per_s,
                    rate_grace_s=self.limits.data_rate_grace_s)
            reply = self._data_problem(outcome.status)
            if reply is None and f.error is not None:
                log.error("spool write failed (qid %s): %s", txn.qid, f.error)
                reply = Reply(452, "4.3.1", "Insufficient system storage")
            if reply is not None:
                reply = reply.with_qid(txn.qid)
                txn.size = outcome.size
                self._end_transaction(reply, "refused")
                await self.reply(reply)
                return
            try:
                async with self._budget(self.engine.command_budget_s("DATA")):
                    reply = await self.engine.on_data(st, txn, spool, outcome.size,
                                                      head=f.capture.take(), spool_fd=f.fd)
            except TimeoutError:
                log.error("end-of-data processing timed out (qid %s)", txn.qid)
                reply = Reply(451, "4.4.2", f"Timeout processing message ({txn.qid})")
            except Exception:
                log.exception("internal error at end of data (qid %s)", txn.qid)
                reply = R.INTERNAL.with_qid(txn.qid)
            self._end_transaction(reply, "done")
            await self.reply(reply)
        except DataTooSlow as e:  # a dribbler holds a connection slot: cut it (Postfix too)
            event(log, "data-too-slow", level=logging.WARNING, qid=txn.qid, sid=st.sid,
                  client=st.client_ip, bytes=e.wire_bytes, seconds=round(e.elapsed_s, 1),
                  min_rate_bytes_per_s=self.limits.min_data_rate_bytes_per_s)
            txn.size = e.wire_bytes
            self._end_transaction(None, "too-slow")
            await self.close_with(Reply(421, "4.4.2", f"Data too slow, closing connection "
                                                      f"({txn.qid})"), "data-too-slow")
        except DataTimeout:
            self._end_transaction(None, "timeout")
            await self.close_with(Reply(421, "4.4.2", f"Timeout during DATA ({txn.qid})"),
                                  "data-timeout")
        except DataEOF:
            self._end_transaction(None, "aborted")
            self.end_reason = "eof-in-data"
        finally:
            if f is not None:
                f.close()
            spares.discard(spool, missing_ok=True)

    def _data_problem(self, status: DataStatus) -> Reply | None:
        if status is DataStatus.OK:
            return None
        if status is DataStatus.TOO_BIG:
            return Reply(552, "5.3.4", "Message size exceeds fixed limit of "
                                       f"{self.limits.max_message_bytes} bytes")
        if status is DataStatus.LINE_TOO_LONG:
            return Reply(500, "5.6.0", f"Line too long (limit {self.limits.max_line_bytes} "
                                       "bytes with CRLF, RFC 5321 4.5.3.1.6)")
        return Reply(550, "5.6.0", "Message contains bare CR or LF (RFC 5321 2.3.8), "
                                   "not accepted")

    def _end_transaction(self, reply: Reply | None, outcome: str) -> None:
        txn, self.txn = self.txn, None
        if txn is None or self.state is None:
            return
        self.engine.log_transaction(self.state, txn, reply, outcome)
        relay = txn.relay
        if relay is not None and relay.client is not None:  # after our reply, not before it
            done = outcome == "done" and reply is not None and reply.is_ok
            self.runtime.background(relay.close() if done else relay.abort())

    async def cmd_rset(self, arg: str) -> None:
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._end_transaction(None, "aborted")
        await self.reply(R.OK)

    async def cmd_noop(self, arg: str) -> None:
        await self.reply(R.OK)

    async def cmd_quit(self, arg: str) -> None:
        self.end_reason = "quit"
        await self.close_with(R.BYE, "quit")

    async def cmd_vrfy(self, arg: str) -> None:
        if not arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        await self.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will try RCPT"))

    async def cmd_help(self, arg: str) -> None:
        await self.reply(Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP "
                                             "QUIT VRFY STARTTLS; see RFC 5321"))

    async def cmd_not_implemented(self, arg: str) -> None:
        await self.reply(R.NOT_IMPLEMENTED)

    async def cmd_starttls(self, arg: str) -> None:
        st = self.state
        assert st is not None
        if arg:
            await self.reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self.tls_context is None:
            await self.reply(Reply(502, "5.5.1", "STARTTLS not available"))
            return
        if st.tls:
            await self.reply(Reply(503, "5.5.1", "TLS already active"))
            return
        await self.push("220 2.0.0 Ready to start TLS")
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(self.loop, self, self.tls_context, waiter,
                                                  server_side=True)
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            async with asyncio.timeout(self.limits.idle_timeout_s):
                await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        # RFC 3207 4.2: forget everything learnt before TLS. Plaintext that was pipelined after
        # STARTTLS was dropped by aiosmtpd's connection_made (reader buffer cleared).
        self._end_transaction(None, "aborted")
        st.tls, st.helo, st.esmtp = True, None, False


class SmtpServer(SmtpSession, SMTP):
    """The session on aiosmtpd's connection plumbing and STARTTLS switch (the normal case)."""


# The session on asyncio's streams alone: when aiosmtpd's hooks are not as expected
StreamSmtpServer: type[SmtpSession] = type("StreamSmtpServer", (SmtpSession, StreamBase), {})


def server_class() -> type[SmtpSession]:
    """The protocol class for the listeners (patch ``aiosmtpd.client-loop``)."""
    return SmtpServer if CLIENT_LOOP else StreamSmtpServer


# verb -> handler; a table of plain functions (bound methods kept per session would tie each
# session into a reference cycle)
COMMANDS: dict[str, Callable[[SmtpSession, str], Awaitable[None]]] = {
    "HELO": SmtpSession.cmd_helo, "EHLO": SmtpSession.cmd_ehlo, "MAIL": SmtpSession.cmd_mail,
    "RCPT": SmtpSession.cmd_rcpt, "DATA": SmtpSession.cmd_data, "RSET": SmtpSession.cmd_rset,
    "NOOP": SmtpSession.cmd_noop, "QUIT": SmtpSession.cmd_quit, "VRFY": SmtpSession.cmd_vrfy,
    "EXPN": SmtpSession.cmd_not_implemented, "HELP": SmtpSession.cmd_help,
    "STARTTLS": SmtpSession.cmd_starttls, "AUTH": SmtpSession.cmd_not_implemented,
    "BDAT": SmtpSession.cmd_not_implemented, "ETRN": SmtpSession.cmd_not_implemented,
    "TURN": SmtpSession.cmd_not_implemented,
}


class _open_spool:
    """A spool file for DATA, created exclusively with mode 0600 (a spare inode when there is
    one, ``gateway.spares``), written in large buffers. The buffer is made at the first write,
    not at the 354: a session waiting for its client's data holds none (200 sessions between
    354 and their data would hold 1.6 MB of empty buffers). A
    write error (a full disk) is remembered, not raised: the rest of DATA must still be read to
    its end, or it would be taken for commands."""

    def __init__(self, path: Path, spares: SpareFiles, *, keep_open: bool = False) -> None:
        self.path = path
        self.spares = spares
        self.keep_open = keep_open  # leaving the block flushes; ``close`` closes
        self.error: OSError | None = None
        self.capture = HeadCapture()  # the header block, for the engine (no read back)

    def __enter__(self) -> _open_spool:
        fd = self.spares.create(self.path)
        try:
            self.f: io.BufferedWriter | io.RawIOBase = io.FileIO(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        return self

    @property
    def fd(self) -> int | None:
        """The open descriptor (flushed), or None once closed."""
        return None if self.f.closed else self.f.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a write error was seen at the flush already
            self.f.close()

    def write(self, data: bytes) -> None:
        if not self.capture.done:
            self.capture.feed(data)
        if self.error is None:
            try:
                if not isinstance(self.f, io.BufferedWriter):
                    self.f = io.BufferedWriter(self.f, SPOOL_BUFFER_BYTES)
                self.f.write(data)
            except OSError as e:
                self.error = e

    def __exit__(self, *exc: object) -> None:
        try:
            if self.keep_open:  # flushed; the buffer goes now (the file may wait in the queue
                # commit a while, and 200 sessions' buffers are 1.6 MB)
                if isinstance(self.f, io.BufferedWriter):
                    self.f = self.f.detach()
            else:
                self.f.close()
        except OSError as e:
            self.error = self.error or e
