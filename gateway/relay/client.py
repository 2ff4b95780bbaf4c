"""Async SMTP/LMTP client that talks to the downstream MTA: one connection, commands in lockstep,
LMTP per-recipient DATA replies, and message bodies streamed dot-stuffed in large writes.

Every await has a deadline. Transport failures (refused, timed out, dropped, garbage on the wire)
raise :class:`RelayTempError` and leave the client closed; SMTP answers (2xx-5xx) to commands are
returned as :class:`Reply` values for the caller to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any

from gateway.deadline import Deadline
from gateway.errors import RelayPermError, RelayTempError
from gateway.replies import Reply

MAX_REPLY_LINE = 4096  # bytes, CRLF included (RFC 5321 asks for 512; be generous)
MAX_REPLY_LINES = 100
WRITE_BUFFER = 64 * 1024  # message data is written in buffers of at least this size
QUIT_TIMEOUT_S = 5.0

_LINE_RE = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?")
_STATUS_RE = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")
_DEFAULT_STATUS = {"2": "2.0.0", "3": "", "4": "4.0.0", "5": "5.0.0"}

_Opener = Callable[[], Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class _ProtocolError(ValueError):
    """The peer sent something that is not an SMTP reply (becomes RelayTempError)."""


class _SourceError(Exception):
    """The caller's chunk source raised (internal; the original exception is re-raised)."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


def parse_reply(lines: Sequence[str]) -> Reply:
    """Build a Reply from the wire lines of one reply (CRLF stripped).

    The enhanced status code is taken from the first line's text when its class matches the
    code, and stripped from every line that repeats it; otherwise a default class status is used.
    Multi-line texts are joined with ``\\n`` (as :meth:`Reply.lines` expects). Raises
    ValueError for lines that are not a well-formed SMTP reply.
    """
    if not lines:
        raise _ProtocolError("empty reply")
    code = 0
    texts: list[str] = []
    for i, line in enumerate(lines):
        m = _LINE_RE.fullmatch(line)
        if m is None:
            raise _ProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        last = m[2] != "-"
        if last != (i == len(lines) - 1):
            raise _ProtocolError("bad multi-line reply continuation")
        if i == 0:
            code = int(m[1])
        elif int(m[1]) != code:
            raise _ProtocolError(f"reply code changed within a reply: {line[:80]!r}")
        texts.append(m[3] or "")
    sm = _STATUS_RE.match(texts[0])
    if sm is not None and sm[1] == str(code)[0]:
        status = f"{sm[1]}.{sm[2]}.{sm[3]}"
        texts = [_strip_status(t, status) for t in texts]
    else:
        status = _DEFAULT_STATUS[str(code)[0]]
    return Reply(code, status, "\n".join(texts))


def _strip_status(text: str, status: str) -> str:
    if text == status:
        return ""
    if text.startswith(status + " "):
        return text[len(status):].lstrip(" ")
    return text


class _DotStuffer:
    """Dot-stuffs a byte stream given in arbitrary chunks and terminates it with CRLF.CRLF.

    A '.' after any LF (not only after CRLF) is doubled, so even a downstream that accepts bare
    LF as a line end cannot be made to see an early end of data.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._tail = b""  # the last two bytes of input seen
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._empty = False
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and chunk[:1] == b".":
            out = b"." + out
        self._at_line_start = chunk[-1:] == b"\n"
        self._tail = (self._tail + chunk[-2:])[-2:]
        return out

    def finish(self) -> bytes:
        """The bytes that end the data: a CRLF if the message lacks one, then ``.`` CRLF."""
        if self._empty or self._tail == b"\r\n":
            return b".\r\n"
        if self._tail.endswith(b"\r"):
            return b"\n.\r\n"
        return b"\r\n.\r\n"


async def _iter_source(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    """Yield the caller's chunks; an exception from the source is wrapped in _SourceError."""
    if isinstance(chunks, bytes | bytearray | memoryview):
        yield bytes(chunks)
        return
    if isinstance(chunks, AsyncIterable):
        ait = aiter(chunks)
        while True:
            try:
                chunk = await anext(ait)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise _SourceError(exc) from exc
            yield bytes(chunk)
    else:
        it = iter(chunks)
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise _SourceError(exc) from exc
            yield bytes(chunk)


def _check_arg(what: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"{what} contains CR, LF or NUL: {value[:80]!r}")


def _angle(addr: str) -> str:
    return addr if addr.startswith("<") and addr.endswith(">") else f"<{addr}>"


class DownstreamClient:
    """One SMTP or LMTP connection to the downstream. Not safe for concurrent use: one command
    at a time. After any exception the client is closed and every later command raises."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, *,
                 lmtp: bool, command_timeout_s: float, data_timeout_s: float) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer  # "host:port" or "unix:/path", used in error messages
        # the server's host name (or address) as we reached it, for a DSN's Remote-MTA
        # (RFC 3464 2.3.5); None over a unix socket. ``connect_mx`` sets the MX host's name.
        self.remote_name: str | None = None
        self._lmtp = lmtp
        self._command_timeout_s = command_timeout_s
        self._data_timeout_s = data_timeout_s
        self._closed = False
        self._deadline = Deadline()  # each step's timeout, one timer per connection
        self._helo_name = "localhost"
        self.tls = False  # STARTTLS done
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}  # upper-cased EHLO/LHLO keywords -> params
        # a MAIL was accepted and the transaction not yet ended (end of data or RSET): a pool
        # must RSET before the next MAIL
        self.in_transaction = False

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect(cls, host: str, port: int, *, lmtp: bool = False,
                      helo_name: str = "localhost", connect_timeout_s: float = 30,
                      command_timeout_s: float = 300,
                      data_timeout_s: float = 600) -> DownstreamClient:
        """Connect over TCP, read the greeting and say EHLO (LHLO for LMTP)."""
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

        def opener() -> Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_connection(host, port, limit=MAX_REPLY_LINE)

        client = await cls._open(opener, peer, lmtp=lmtp, helo_name=helo_name,
                                 connect_timeout_s=connect_timeout_s,
                                 command_timeout_s=command_timeout_s,
                                 data_timeout_s=data_timeout_s)
        client.remote_name = host
        return client

    @classmethod
    async def connect_unix(cls, path: str, *, lmtp: bool = False, helo_name: str = "localhost",
                           connect_timeout_s: float = 30, command_timeout_s: float = 300,
                           data_timeout_s: float = 600) -> DownstreamClient:
        """Connect over a unix socket (usually LMTP), read the greeting and say LHLO/EHLO."""

        def opener() -> Coroutine[Any, Any, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_unix_connection(path, limit=MAX_REPLY_LINE)

        return await cls._open(opener, f"unix:{path}", lmtp=lmtp, helo_name=helo_name,
                               connect_timeout_s=connect_timeout_s,
                               command_timeout_s=command_timeout_s, data_timeout_s=data_timeout_s)

    @classmethod
    async def _open(cls, opener: _Opener, peer: str, *, lmtp: bool, helo_name: str,
                    connect_timeout_s: float, command_timeout_s: float,
                    data_timeout_s: float) -> DownstreamClient:
        _check_arg("helo name", helo_name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                reader, writer = await opener()
        except TimeoutError as exc:
            # No answer from the host at all: RFC 3463 X.4.1.
            msg = f"downstream {peer}: connect: no answer within {connect_timeout_s:g}s"
            raise RelayTempError(msg, code=451, status="4.4.1", text=msg) from exc
        except OSError as exc:
            detail = exc.strerror or str(exc) or type(exc).__name__
            msg = f"downstream {peer}: connect: {detail}"
            raise RelayTempError(msg, code=451, status="4.4.1", text=msg) from exc
        client = cls(reader, writer, peer, lmtp=lmtp, command_timeout_s=command_timeout_s,
                     data_timeout_s=data_timeout_s)
        greeting = await client._exchange("greeting", None, deadline - loop.time())
        client.greeting = greeting
        if greeting.code // 100 != 2:
            await client.quit()
            raise client._refused("greeting", greeting)
        await client._hello(helo_name)
        return client

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """STARTTLS (RFC 3207), then EHLO/LHLO again. A refusal raises like any refused step;
        a failed handshake raises RelayTempError 4.7.5 (the client is closed either way)."""
        reply = await self._exchange("STARTTLS", "STARTTLS", self._command_timeout_s)
        if reply.code != 220:
            await self.quit()
            raise self._refused("STARTTLS", reply)
        try:
            async with asyncio.timeout(self._command_timeout_s):
                await self._writer.start_tls(context, server_hostname=server_hostname)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.close()
            msg = f"downstream {self.peer}: TLS handshake: {exc}"
            raise RelayTempError(msg, code=451, status="4.7.5", text=msg) from exc
        self.tls = True
        self.extensions = {}
        await self._hello(self._helo_name)

    async def _hello(self, helo_name: str) -> None:
        self._helo_name = helo_name
        verb = "LHLO" if self._lmtp else "EHLO"
        reply, lines = await self._exchange_lines(verb, f"{verb} {helo_name}",
                                                  self._command_timeout_s)
        if reply.code // 100 == 2:
            self.extensions = _parse_extensions(lines)
            return
        if reply.code // 100 == 5 and not self._lmtp:
            reply = await self._exchange("HELO", f"HELO {helo_name}", self._command_timeout_s)
            if reply.code // 100 == 2:
                self.extensions = {}
                return
            verb = "HELO"
        await self.quit()
        raise self._refused(verb, reply)

    def _refused(self, step: str, reply: Reply) -> RelayTempError | RelayPermError:
        msg = f"downstream {self.peer}: {step}: {reply.render()}"
        kind = RelayPermError if reply.code // 100 == 5 else RelayTempError
        status = reply.status or "4.5.0"
        code = reply.code
        if code // 100 not in (4, 5):  # e.g. a 3xx greeting: a protocol violation
            code, status = 451, "4.5.0"
        return kind(msg, code=code, status=status, text=reply.text)

    # -- commands ------------------------------------------------------------------------------

    @property
    def is_lmtp(self) -> bool:
        return self._lmtp

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_closed(self) -> bool:
        """The downstream has closed its side (EOF seen, nothing left to read)."""
        return self._reader.at_eof()

    async def mail(self, sender: str, params: Sequence[str] = ()) -> Reply:
        """MAIL FROM:<sender> [params]; ``sender`` may be "" for the null sender."""
        reply = await self._command("MAIL FROM", f"MAIL FROM:{_angle(sender)}", sender, params)
        self.in_transaction = reply.is_ok
        return reply

    async def rcpt(self, rcpt: str, params: Sequence[str] = ()) -> Reply:
        """RCPT TO:<rcpt> [params]."""
        return await self._command("RCPT TO", f"RCPT TO:{_angle(rcpt)}", rcpt, params)

    async def rset(self) -> Reply:
        reply = await self._command("RSET", "RSET", "", ())
        if reply.is_ok:
            self.in_transaction = False
        return reply

    async def envelope(self, sender: str, params: Sequence[str],
                       rcpts: Sequence[tuple[str, Sequence[str]]]) -> tuple[Reply, list[Reply]]:
        """MAIL and every RCPT: in one write when the server offers PIPELINING (RFC 2920),
        else one by one. Returns the MAIL reply and, if it was accepted, one reply per RCPT."""
        if "PIPELINING" not in self.extensions:
            mail = await self.mail(sender, params)
            if not mail.is_ok:
                return mail, []
            return mail, [await self.rcpt(a, p) for a, p in rcpts]
        mail, replies, _ = await self._pipelined(sender, params, rcpts, data=False)
        return mail, replies

    async def envelope_data(self, sender: str, params: Sequence[str],
                            rcpts: Sequence[tuple[str, Sequence[str]]]
                            ) -> tuple[Reply, list[Reply], Reply]:
        """MAIL, every RCPT and DATA in one write (the server must offer PIPELINING: RFC 2920
        lets DATA end a group), so a transaction costs one round trip before the message.
        Returns the MAIL reply, one reply per RCPT if MAIL was accepted, and the DATA reply.
        After a 354 the caller sends the message with ``after_data`` if a recipient was
        accepted; if none was (a server should then refuse DATA, but may not), the message is
        ended here with a lone dot, as RFC 2920 3.1 asks, and the transaction is over."""
        if "PIPELINING" not in self.extensions:
            raise ValueError(f"downstream {self.peer} does not offer PIPELINING")
        mail, replies, data = await self._pipelined(sender, params, rcpts, data=True)
        assert data is not None
        if data.code == 354 and not any(r.is_ok for r in replies):
            if self._lmtp:  # replies to an LMTP message without recipients: none or one?
                self.close()
            else:
                await self.after_data(data, (), accepted_rcpts=1)  # "." CRLF and its reply
        return mail, replies, data

    async def _pipelined(self, sender: str, params: Sequence[str],
                         rcpts: Sequence[tuple[str, Sequence[str]]], *, data: bool
                         ) -> tuple[Reply, list[Reply], Reply | None]:
        lines = [self._line("MAIL FROM", f"MAIL FROM:{_angle(sender)}", sender, params)]
        lines += [self._line("RCPT TO", f"RCPT TO:{_angle(a)}", a, p) for a, p in rcpts]
        if data:
            lines.append("DATA")
        if self._closed:
            raise self._translate(ConnectionError("connection already closed"), "MAIL FROM",
                                  self._command_timeout_s)
        try:
            async with self._deadline(self._command_timeout_s):
                self._writer.write("".join(f"{x}\r\n" for x in lines).encode("utf-8"))
                await self._writer.drain()
        except Exception as exc:
            self.close()
            raise self._translate(exc, "MAIL FROM", self._command_timeout_s) from exc
        mail = await self._exchange("MAIL FROM", None, self._command_timeout_s)
        self.in_transaction = mail.is_ok
        replies: list[Reply] = []
        for step in ["RCPT TO"] * len(rcpts) + (["DATA"] if data else []):
            if self._closed:  # a 421 ended the session: the rest gets the same answer
                replies.append(replies[-1] if replies else mail)
                continue
            replies.append(await self._exchange(step, None, self._command_timeout_s))
        reply_to_data = replies.pop() if data else None
        return mail, replies if mail.is_ok else [], reply_to_data

    def _line(self, step: str, line: str, arg: str, params: Sequence[str]) -> str:
        try:
            _check_arg(step, arg)
            for p in params:
                _check_arg(f"{step} parameter", p)
        except ValueError:
            self.close()
            raise
        return " ".join([line, *params]) if params else line

    async def data(self, chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                   accepted_rcpts: int = 1) -> list[Reply]:
        """Send DATA and stream the message; return the reply (SMTP) or one reply per accepted
        recipient in RCPT order (LMTP).

        ``chunks`` are raw message bytes, CRLF-clean and not dot-stuffed, cut anywhere. They are
        dot-stuffed, terminated with CRLF if needed, and written in buffers of at least
        ``WRITE_BUFFER`` bytes, the last one carrying the final ``.`` CRLF. If DATA itself is
        refused (4xx/5xx), that reply is returned (once per recipient for LMTP) and ``chunks``
        is not consumed. If an LMTP connection fails after some per-recipient replies were read,
        the missing ones are returned as ``451 4.4.2`` replies so that delivered recipients are
        not retried. An exception raised by ``chunks`` closes the client and propagates as is.
        """
        self._data_replies(accepted_rcpts)
        reply = await self._exchange("DATA", "DATA", self._command_timeout_s)
        return await self.after_data(reply, chunks, accepted_rcpts=accepted_rcpts)

    async def after_data(self, reply: Reply, chunks: AsyncIterable[bytes] | Iterable[bytes], *,
                         accepted_rcpts: int = 1) -> list[Reply]:
        """``data`` from the server's reply to DATA on: the message after a 354, else that
        reply (once per recipient for LMTP)."""
        count = self._data_replies(accepted_rcpts)
        if reply.code != 354:
            if reply.code < 400:
                self.close()
                msg = f"downstream {self.peer}: DATA: unexpected reply {reply.render()!r}"
                raise RelayTempError(msg, code=451, status="4.5.0", text=msg)
            return [reply] * count
        replies: list[Reply] = []
        try:
            async with self._deadline(self._data_timeout_s):
                await self._send_body(chunks)
                while len(replies) < count:
                    replies.append(parse_reply(await self._read_lines()))
        except _SourceError as exc:
            self.close()
            raise exc.original from None
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            err = self._translate(exc, "end of data", self._data_timeout_s)
            if not replies:
                raise err from exc
            missing = Reply(451, "4.4.2", f"{err} (after {len(replies)} of {count} replies)")
            return replies + [missing] * (count - len(replies))
        if any(r.code == 421 for r in replies):
            self.close()
        self.in_transaction = False  # the final reply(s) to the data end it, whatever they say
        return replies

    def _data_replies(self, accepted_rcpts: int) -> int:
        """How many replies end the data: one per accepted recipient for LMTP, else one."""
        if not self._lmtp:
            return 1
        if accepted_rcpts < 1:
            self.close()
            raise ValueError("LMTP DATA needs at least one accepted recipient")
        return accepted_rcpts

    async def quit(self) -> None:
        """Say QUIT and close; best effort, never raises (cancellation still propagates)."""
        if self._closed:
            return
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(min(self._command_timeout_s, QUIT_TIMEOUT_S)):
                    self._writer.write(b"QUIT\r\n")
                    await self._writer.drain()
                    await self._read_lines()
        finally:
            self.close()
        with contextlib.suppress(Exception):  # the peer may already be gone
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()

    def close(self) -> None:
        """Close the connection without QUIT. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._deadline.close()
        try:
            self._writer.close()
        except RuntimeError:  # event loop already closed
            pass

    async def __aenter__(self) -> DownstreamClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.quit()

    # -- internals -----------------------------------------------------------------------------

    async def _command(self, step: str, line: str, arg: str, params: Sequence[str]) -> Reply:
        return await self._exchange(step, self._line(step, line, arg, params),
                                    self._command_timeout_s)

    async def _exchange(self, step: str, line: str | None, timeout_s: float) -> Reply:
        reply, _ = await self._exchange_lines(step, line, timeout_s)
        return reply

    async def _exchange_lines(self, step: str, line: str | None,
                              timeout_s: float) -> tuple[Reply, list[str]]:
        """Send ``line`` (if any) and read one reply within ``timeout_s``."""
        if self._closed:
            msg = f"downstream {self.peer}: {step}: connection already closed"
            raise RelayTempError(msg, code=451, status="4.4.2", text=msg)
        try:
            async with self._deadline(timeout_s):
                if line is not None:
                    self._writer.write(line.encode("utf-8") + b"\r\n")
                    await self._writer.drain()
                lines = await self._read_lines()
                reply = parse_reply(lines)
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise self._translate(exc, step, timeout_s) from exc
        if reply.code == 421:  # the server is closing the channel (RFC 5321 3.8)
            self.close()
        return reply, lines

    async def _read_lines(self) -> list[str]:
        """The raw lines (CRLF stripped) of one reply; the caller applies the deadline."""
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            raw = await self._reader.readuntil(b"\n")
            if len(raw) > MAX_REPLY_LINE:
                raise _ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(line)
            m = _LINE_RE.fullmatch(line)
            if m is None:
                raise _ProtocolError(f"not an SMTP reply line: {line[:80]!r}")
            if m[2] != "-":
                return lines
        raise _ProtocolError(f"reply has more than {MAX_REPLY_LINES} lines")

    async def _send_body(self, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        stuffer = _DotStuffer()
        parts: list[bytes] = []
        size = 0
        async for chunk in _iter_source(chunks):
            out = stuffer.feed(chunk)
            if not out:
                continue
            parts.append(out)
            size += len(out)
            if size >= WRITE_BUFFER:
                self._writer.write(b"".join(parts))
                parts, size = [], 0
                await self._writer.drain()
        parts.append(stuffer.finish())
        self._writer.write(b"".join(parts))
        await self._writer.drain()

    def _translate(self, exc: Exception, step: str, timeout_s: float) -> RelayTempError:
        if isinstance(exc, RelayTempError):
            return exc
        status = "4.4.2"
        if isinstance(exc, TimeoutError):
            detail = f"timed out after {max(timeout_s, 0):.3g}s"
        elif isinstance(exc, asyncio.IncompleteReadError):
            detail = "connection closed by peer"
        elif isinstance(exc, _ProtocolError | asyncio.LimitOverrunError | UnicodeError):
            status = "4.5.0"
            detail = f"bad reply: {exc}"
        elif isinstance(exc, OSError):
            detail = f"connection lost: {exc.strerror or str(exc) or type(exc).__name__}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        msg = f"downstream {self.peer}: {step}: {detail}"
        return RelayTempError(msg, code=451, status=status, text=msg)


def _parse_extensions(lines: Sequence[str]) -> dict[str, str]:
    """EHLO/LHLO keywords (upper-cased) -> parameters, from the reply's lines after the first."""
    out: dict[str, str] = {}
    for line in lines[1:]:
        text = line[4:].strip()
        if not text:
            continue
        keyword, _, params = text.partition(" ")
        out[keyword.upper()] = params.strip()
    return out
