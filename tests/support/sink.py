"""A scriptable SMTP/LMTP sink server for tests that records exactly what it received on the wire.

In process: ``with Sink(lmtp=True, replies={...}) as sink:`` then talk to 127.0.0.1:``sink.port``
and ``sink.wait_for(1)``. As a process: ``python -m tests.support.sink --port 0 [--lmtp]
[--dir DIR] [--reply KEY=REPLY ...]`` prints ``PORT <n>`` and writes NNNNNN.eml + NNNNNN.json.

Reply overrides are keyed by command (EHLO HELO LHLO MAIL RCPT DATA DATA_END RSET NOOP QUIT),
optionally for one address (``RCPT:bad@x.test``, ``DATA_END:b@x.test`` for an LMTP recipient);
values are wire text, ``\\n`` between the lines of a multi-line reply. A 421 reply closes the
connection. End of data is only CRLF.CRLF; bare CR/LF are recorded verbatim.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from gateway.replies import Reply

DEFAULT_EXTENSIONS = ("PIPELINING", "8BITMIME", "SIZE", "ENHANCEDSTATUSCODES", "SMTPUTF8")
HOSTNAME = "sink.test"
READ_SIZE = 256 * 1024
MAX_COMMAND = 64 * 1024
IDLE_TIMEOUT_S = 120.0
WRITE_TIMEOUT_S = 30.0

_PATH_RE = re.compile(r"(?i)(FROM|TO):\s*<([^>]*)>\s*(.*)")


@dataclass(frozen=True)
class Message:
    """One transaction whose data was received in full."""

    connection: int  # index into Sink.transcript
    helo: str
    mail_from: str
    mail_params: tuple[str, ...]
    rcpts: tuple[str, ...]  # accepted recipients, in order
    rcpt_params: tuple[tuple[str, ...], ...]
    raw: bytes  # exactly as on the wire after the 354, up to and including the CRLF before "."
    data: bytes  # raw, dot-unstuffed
    replies: tuple[str, ...]  # end-of-data replies sent (one per recipient for LMTP; () if dropped)
    reads: int  # socket reads it took to receive the data


@dataclass(frozen=True)
class Behaviour:
    lmtp: bool = False
    greeting: str | None = None
    replies: Mapping[str, str] = field(default_factory=dict)
    drop_after_data: bool = False
    delay_s: float = 0.0
    delay_on: frozenset[str] | None = None  # command names (and "GREETING"); None: every reply
    ehlo_extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    # after this many messages on one connection the next MAIL gets 421 and the connection
    # closes, as servers with a per-connection message limit do (0: no limit)
    messages_per_connection: int = 0
    # hold the replies of a transaction from its MAIL on until this command arrives ("RCPT",
    # "DATA"): a server that only answers a client that pipelines them (RFC 2920)
    hold_until: str | None = None
    # answer DATA with 354 even when no recipient was accepted, as RFC 2920 3.1 warns a
    # server may (a conforming one says 503/554)
    data_without_rcpts: bool = False


def _normalise_replies(replies: Mapping[str, str | Reply]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in replies.items():
        cmd, sep, addr = key.partition(":")
        text = value.render() if isinstance(value, Reply) else value
        out[f"{cmd.upper()}{sep}{addr.lower()}"] = text
    return out


def unstuff(raw: bytes) -> bytes:
    """Remove the dot-stuffing of lines (CRLF-delimited) that start with '.'."""
    out = raw[1:] if raw.startswith(b".") else raw
    return out.replace(b"\r\n.", b"\r\n")


class SinkServer:
    """The sink on the running event loop (see :class:`Sink` for the threaded wrapper)."""

    def __init__(self, behaviour: Behaviour,
                 on_message: Callable[[Message], None] | None = None) -> None:
        self.behaviour = behaviour
        self.on_message = on_message
        self.messages: list[Message] = []
        self.transcripts: list[bytearray] = []
        self.commands: list[str] = []  # every command line received, CRLF stripped
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._unix_path: str | None = None

    @property
    def connections(self) -> int:
        return len(self.transcripts)

    @property
    def open_connections(self) -> int:
        """Connections being served right now."""
        return len(self._tasks)

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    unix_path: str | None = None) -> None:
        if unix_path is not None:
            self._unix_path = unix_path
            self._server = await asyncio.start_unix_server(self._handle, unix_path)
        else:
            self._server = await asyncio.start_server(self._handle, host, port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        transcript = bytearray()
        self.transcripts.append(transcript)
        session = _Session(self, len(self.transcripts) - 1, transcript, reader, writer)
        try:
            await session.run()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    def record(self, message: Message) -> None:
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)


class _Session:
    """One connection: reads commands (pipelined or not) and answers them in order."""

    def __init__(self, server: SinkServer, index: int, transcript: bytearray,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.b = server.behaviour
        self.overrides = _normalise_replies(self.b.replies)
        self.index = index
        self.transcript = transcript
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.helo = ""
        self.received = 0  # messages on this connection
        self.held: list[bytes] | None = None  # replies held back (``hold_until``)
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params: tuple[str, ...] = ()
        self.rcpts: list[str] = []
        self.rcpt_params: list[tuple[str, ...]] = []

    async def _fill(self) -> bool:
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            chunk = await self.reader.read(READ_SIZE)
        if not chunk:
            return False
        self.buf += chunk
        self.transcript += chunk
        return True

    async def read_line(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_COMMAND or not await self._fill():
                return None

    async def read_data(self) -> tuple[bytes, int] | None:
        """The raw data up to CRLF.CRLF (final CRLF kept, ".CRLF" consumed) and the reads used."""
        reads, start = 0, 0
        while True:
            if self.buf.startswith(b".\r\n"):  # empty message
                del self.buf[:3]
                return b"", reads
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                raw = bytes(self.buf[: i + 2])
                del self.buf[: i + 5]
                return raw, reads
            start = max(0, len(self.buf) - 4)
            if not await self._fill():
                return None
            reads += 1

    def _pick(self, cmd: str, default: str, addr: str | None = None) -> str:
        if addr is not None and f"{cmd}:{addr.lower()}" in self.overrides:
            return self.overrides[f"{cmd}:{addr.lower()}"]
        return self.overrides.get(cmd, default)

    async def send(self, cmd: str, text: str) -> int:
        """Send a reply (after the configured delay); return its code."""
        if self.b.delay_s and (self.b.delay_on is None or cmd in self.b.delay_on):
            await asyncio.sleep(self.b.delay_s)
        lines = [ln for ln in re.split(r"\r?\n", text) if ln]
        wire = b"".join(ln.encode("utf-8") + b"\r\n" for ln in lines)
        if self.held is not None:
            self.held.append(wire)
        else:
            self.writer.write(wire)
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self.writer.drain()
        try:
            return int(lines[0][:3])
        except (IndexError, ValueError):
            return 0

    async def run(self) -> None:
        kind = "LMTP" if self.b.lmtp else "ESMTP"
        code = await self.send("GREETING", self.b.greeting or f"220 {HOSTNAME} {kind} sink")
        if code == 421:
            return
        refusing = code // 100 != 2  # e.g. 554: only QUIT is accepted (RFC 5321 3.1)
        while True:
            line = await self.read_line()
            if line is None:
                return
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self.server.commands.append(text)
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            if self.b.hold_until and verb == "MAIL":
                self.held = []
            elif verb == self.b.hold_until and self.held is not None:
                self.writer.write(b"".join(self.held))
                self.held = None
            if refusing and verb != "QUIT":
                code = await self.send(verb, "503 5.5.1 Bad sequence of commands")
            else:
                code = await self.dispatch(verb, arg.strip())
            if code in (221, 421, -1):
                return

    async def dispatch(self, verb: str, arg: str) -> int:
        lmtp = self.b.lmtp
        if verb in ("EHLO", "HELO", "LHLO"):
            if (verb == "LHLO") != lmtp:
                return await self.send(verb, "500 5.5.1 Use LHLO for LMTP, EHLO/HELO for SMTP")
            if not arg:
                return await self.send(verb, "501 5.5.4 Hostname required")
            if verb == "HELO":
                default = f"250 {HOSTNAME}"
            else:
                default = "\n".join([f"250 {HOSTNAME}", *(f"250 {e}" for e in
                                                          self.b.ehlo_extensions)])
            code = await self.send(verb, self._pick(verb, _continued(default)))
            if code // 100 == 2:
                self.helo = arg
                self.reset()
            return code
        if verb == "MAIL":
            m = _PATH_RE.fullmatch(arg)
            if not self.helo or self.mail_from is not None:
                return await self.send(verb, "503 5.5.1 Bad sequence of commands")
            if m is None or m[1].upper() != "FROM":
                return await self.send(verb, "501 5.5.4 Syntax: MAIL FROM:<address>")
            if self.b.messages_per_connection and self.received >= self.b.messages_per_connection:
                return await self.send(verb, "421 4.7.0 Too many messages on this connection")
            code = await self.send(verb, self._pick(verb, "250 2.1.0 Ok", m[2]))
            if code // 100 == 2:
                self.mail_from, self.mail_params = m[2], tuple(m[3].split())
            return code
        if verb == "RCPT":
            m = _PATH_RE.fullmatch(arg)
            if self.mail_from is None:
                return await self.send(verb, "503 5.5.1 Need MAIL first")
            if m is None or m[1].upper() != "TO":
                return await self.send(verb, "501 5.5.4 Syntax: RCPT TO:<address>")
            code = await self.send(verb, self._pick(verb, "250 2.1.5 Ok", m[2]))
            if code // 100 == 2:
                self.rcpts.append(m[2])
                self.rcpt_params.append(tuple(m[3].split()))
            return code
        if verb == "DATA":
            return await self.data()
        if verb in ("RSET", "NOOP"):
            if verb == "RSET":
                self.reset()
            return await self.send(verb, self._pick(verb, "250 2.0.0 Ok"))
        if verb == "QUIT":
            return await self.send(verb, self._pick(verb, "221 2.0.0 Bye"))
        return await self.send(verb, "500 5.5.2 Command unrecognized")

    async def data(self) -> int:
        if self.mail_from is None or not (self.rcpts or self.b.data_without_rcpts):
            return await self.send("DATA", "503 5.5.1 Need MAIL and RCPT first")
        code = await self.send("DATA", self._pick("DATA", "354 End data with <CR><LF>.<CR><LF>"))
        if code != 354:
            return code
        got = await self.read_data()
        if got is None:
            return -1
        raw, reads = got
        n = len(self.server.messages) + 1
        if self.b.drop_after_data:
            replies: list[str] = []
        elif self.b.lmtp:
            replies = [self._pick("DATA_END", f"250 2.1.5 <{r}> delivered as {n}", r)
                       for r in self.rcpts]
        else:
            replies = [self._pick("DATA_END", f"250 2.0.0 Ok: queued as {n}")]
        self.server.record(Message(
            connection=self.index, helo=self.helo, mail_from=self.mail_from or "",
            mail_params=self.mail_params, rcpts=tuple(self.rcpts),
            rcpt_params=tuple(self.rcpt_params), raw=raw, data=unstuff(raw),
            replies=tuple(replies), reads=reads))
        self.received += 1
        self.reset()
        if self.b.drop_after_data:
            return -1
        code = 250
        for reply in replies:
            code = await self.send("DATA_END", reply)
            if code == 421:
                break
        return code


def _continued(text: str) -> str:
    """Turn "250 a\\n250 b" into "250-a\\n250 b" (multi-line continuation markers)."""
    lines = [ln for ln in re.split(r"\r?\n", text) if ln]
    out = [ln[:3] + "-" + ln[4:] if len(ln) > 3 and ln[3] == " " else ln for ln in lines[:-1]]
    return "\n".join([*out, *lines[-1:]])


class Sink:
    """A SinkServer on its own event loop in a background thread (a context manager)."""

    def __init__(self, *, lmtp: bool = False, greeting: str | Reply | None = None,
                 replies: Mapping[str, str | Reply] | None = None, drop_after_data: bool = False,
                 delay_s: float = 0.0, delay_on: Collection[str] | None = None,
                 ehlo_extensions: Sequence[str] = DEFAULT_EXTENSIONS,
                 messages_per_connection: int = 0, hold_until: str | None = None,
                 data_without_rcpts: bool = False, host: str = "127.0.0.1", port: int = 0,
                 unix_path: str | None = None) -> None:
        self.behaviour = Behaviour(
            lmtp=lmtp, greeting=greeting.render() if isinstance(greeting, Reply) else greeting,
            replies=_normalise_replies(replies or {}), drop_after_data=drop_after_data,
            delay_s=delay_s,
            delay_on=None if delay_on is None else frozenset(c.upper() for c in delay_on),
            ehlo_extensions=tuple(ehlo_extensions),
            messages_per_connection=messages_per_connection, hold_until=hold_until,
            data_without_rcpts=data_without_rcpts)
        self.host = host
        self._port = port  # 0: any free port (see ``port`` once started)
        self.unix_path = unix_path
        self._cond = threading.Condition()
        self._server = SinkServer(self.behaviour, on_message=self._notify)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> Sink:
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"sink did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._server.start(self.host, self._port, self.unix_path)
        self._ready.set()
        await self._stop.wait()  # the sink's lifetime: no deadline
        await self._server.stop()

    def _notify(self, _message: Message) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def messages(self) -> list[Message]:
        return list(self._server.messages)

    @property
    def transcript(self) -> list[bytes]:
        """All bytes received, one entry per connection (in accept order)."""
        return [bytes(t) for t in self._server.transcripts]

    @property
    def commands(self) -> list[str]:
        return list(self._server.commands)

    @property
    def connections(self) -> int:
        return self._server.connections

    @property
    def open_connections(self) -> int:
        return self._server.open_connections

    def wait_for(self, n: int, timeout_s: float = 5.0) -> list[Message]:
        """Block until at least ``n`` messages were received; AssertionError on timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._server.messages) >= n, timeout_s)
        if not ok:
            raise AssertionError(f"sink got {len(self._server.messages)} messages, wanted {n} "
                                 f"within {timeout_s}s; commands: {self.commands[-20:]}")
        return self.messages


# -- process mode ------------------------------------------------------------------------------

def _write_files(directory: Path, message: Message, seq: int) -> None:
    stem = f"{seq:06d}"
    (directory / f"{stem}.eml").write_bytes(message.data)
    envelope = {k: v for k, v in asdict(message).items() if k not in ("raw", "data")}
    envelope["data_file"] = f"{stem}.eml"
    envelope["size"] = len(message.data)
    tmp = directory / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(envelope, indent=2) + "\n")
    os.replace(tmp, directory / f"{stem}.json")  # the .json appears last and whole


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.support.sink", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--unix", metavar="PATH", help="listen on a unix socket instead (prints UNIX)")
    p.add_argument("--lmtp", action="store_true")
    p.add_argument("--dir", type=Path, help="write NNNNNN.eml + NNNNNN.json per message here")
    p.add_argument("--greeting", help='e.g. "421 4.3.2 busy"')
    p.add_argument("--reply", action="append", default=[], metavar="KEY=REPLY",
                   help='override a reply, e.g. "RCPT:bad@x.test=550 5.1.1 no such user"')
    p.add_argument("--drop-after-data", action="store_true")
    p.add_argument("--delay", type=float, default=0.0, metavar="S")
    p.add_argument("--delay-on", action="append", metavar="CMD")
    p.add_argument("--ehlo-extension", action="append", metavar="EXT")
    p.add_argument("--no-ehlo-extensions", action="store_true")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    replies = {}
    for item in args.reply:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--reply needs KEY=REPLY, got {item!r}")
        replies[key] = value.replace("\\n", "\n")
    extensions = () if args.no_ehlo_extensions else tuple(args.ehlo_extension or
                                                          DEFAULT_EXTENSIONS)
    behaviour = Behaviour(
        lmtp=args.lmtp, greeting=args.greeting, replies=_normalise_replies(replies),
        drop_after_data=args.drop_after_data, delay_s=args.delay,
        delay_on=None if args.delay_on is None else frozenset(c.upper() for c in args.delay_on),
        ehlo_extensions=extensions)
    directory: Path | None = args.dir
    server = SinkServer(behaviour)
    if directory is not None:
        server.on_message = lambda m: _write_files(directory, m, len(server.messages))
    await server.start(args.host, args.port, args.unix)
    print(f"UNIX {args.unix}" if args.unix else f"PORT {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()  # until signalled: no deadline
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
