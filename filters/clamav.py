"""The ``clamav`` filter: scans each message with ClamAV's clamd over INSTREAM (unix socket or
TCP), fully async, streaming the spooled file in chunks (the message is never read whole).

What is scanned: the message exactly as received (header and body), so clamd's mail scanner
decodes the MIME parts and attachments itself. At most ``stream_max_bytes`` are sent (clamd
refuses a stream longer than its ``StreamMaxLength`` with an error); of a larger message the
first ``stream_max_bytes`` are scanned and the symbol ``CLAMAV_TRUNCATED`` is added.

Then, when the message is clean, the files hidden where clamd's mail scanner does not look
are scanned too, each as its own INSTREAM: yEnc and BinHex 4.0 blocks inside text parts (clamd
1.4 decodes neither there: a yEnc-encoded EICAR in a text body scanned ``OK``), uuencoded
blocks and the attachments inside TNEF parts (which it does decode; scanned again all the same,
decoded our way) — see :mod:`filters._hidden`. At most ``MAX_HIDDEN_SCANS`` files, each at most
``stream_max_bytes``; a virus found so has the file's path (``part1/setup.exe``) as the
``CLAMAV_VIRUS`` symbol's second option.

Symbols (the scan's outcome, exactly one of the first two):
* ``CLAMAV_CLEAN`` — clamd answered ``stream: OK``.
* ``CLAMAV_VIRUS`` (option: the signature name, e.g. ``Local.Test.EICAR-NDB.UNOFFICIAL``) —
  clamd answered ``stream: NAME FOUND``. With ``action = "reject"`` (the default) also the
  verdict ``554 5.7.1 Message rejected: virus found: NAME``; ``"quarantine"`` quarantines;
  ``"none"`` leaves it to the policy (scores, rules).
* ``CLAMAV_TRUNCATED`` (option: the message size) — only a prefix was scanned.

Failures (connection refused, missing socket, no complete reply within ``scan_timeout_s``, a
clamd ``... ERROR`` reply, a malformed reply) raise :class:`ClamdError`, so the filter's
``on_error`` applies as for any filter: the core adds ``CLAMAV_ERROR`` and, with the default
``tempfail``, answers ``451 4.3.0`` (RFC 3463 X.3.0: a local mail-system problem, not a
security verdict on the message); ``continue`` lets mail through unscanned (still marked
``CLAMAV_ERROR``), ``quarantine`` holds it. The reason is in the log line's ``filter_errors``.

Settings: ``address`` (required: ``"unix:/path"``, ``"tcp:HOST:PORT"`` or ``"HOST:PORT"``,
IPv6 as ``[::1]:3310``), ``scan_timeout_s`` (8: connect + send + reply; keep it below the
filter's ``timeout_s``), ``stream_max_bytes`` (26214400 = clamd's default StreamMaxLength
of 25M; never more than clamd's), ``chunk_bytes`` (65536), ``action`` (reject).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from filters import _hidden
from gateway import mime
from gateway.filterapi import (
    Action,
    ConfigError,
    Filter,
    FilterContext,
    Result,
    Symbol,
    Verdict,
    offload,
)
from gateway.message import Message
from gateway.replies import Reply
from gateway.services import Services
from gateway.settings import action_setting, check_keys, integer, opt_str, positive

SETTINGS = {"address", "scan_timeout_s", "stream_max_bytes", "chunk_bytes", "action"}
MAX_REPLY_BYTES = 4096  # a clamd reply is one short line; anything longer is an error
_SIGNATURE = re.compile(r"[^\x21-\x7e]")  # keep names printable (they go into SMTP replies)
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
MAX_HIDDEN_SCANS = 20  # hidden files (yEnc, BinHex, uuencode, TNEF contents) scanned per message


class ClamdError(Exception):
    """clamd could not scan: unreachable, timed out, or answered with an error."""


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """Where clamd listens: a unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> ClamdAddress:
        if text.startswith("unix:"):
            path = text[5:]
            if not path.startswith("/"):
                raise ValueError("a unix socket path must be absolute (unix:/run/clamd.sock)")
            if len(path.encode()) > _UNIX_PATH_MAX:
                raise ValueError(f"unix socket path longer than {_UNIX_PATH_MAX} bytes")
            return cls(path=path)
        rest = text[4:] if text.startswith("tcp:") else text
        host, sep, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or ":" in host and not rest.startswith("["):
            raise ValueError("must be unix:/PATH, tcp:HOST:PORT or HOST:PORT ([v6]:PORT)")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port {port_text!r}")
        return cls(host=host, port=int(port_text))

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


class Clamd:
    """A minimal async clamd client: INSTREAM, PING, VERSION (one connection per command)."""

    def __init__(self, address: ClamdAddress, timeout_s: float = 8.0,
                 chunk_bytes: int = 65536) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes

    async def ping(self) -> bool:
        """True when clamd answers PONG within ``timeout_s``; never raises for clamd errors."""
        try:
            return await self.command(b"PING") == "PONG"
        except ClamdError:
            return False

    async def version(self) -> str:
        """clamd's version line, e.g. ``ClamAV 1.4.6/…``."""
        return await self.command(b"VERSION")

    async def command(self, name: bytes) -> str:
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._connect()
                try:
                    writer.write(b"z" + name + b"\0")
                    await writer.drain()
                    return await self._reply(reader)
                finally:
                    await _close(writer)
        except TimeoutError:
            raise ClamdError(f"clamd at {self.address}: no reply to {name.decode()} within "
                             f"{self.timeout_s:g}s") from None

    async def instream(self, chunks: AsyncIterator[bytes]) -> str:
        """Send ``chunks`` as one INSTREAM and return clamd's reply (``stream: OK``,
        ``stream: NAME FOUND``); an ``ERROR`` reply or any failure raises ClamdError. The whole
        exchange (connect, send, scan, reply) has one deadline, ``timeout_s``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._connect()
                # Read while sending: clamd answers early (and closes) when it refuses the
                # stream, e.g. "INSTREAM size limit exceeded. ERROR"; that reply says why.
                answer = asyncio.create_task(self._reply(reader))
                try:
                    complete, send_error = await self._send(writer, chunks, answer)
                    try:
                        reply = await answer
                    except ClamdError:
                        if send_error is None:
                            raise
                        raise ClamdError(f"clamd at {self.address}: connection lost while "
                                         f"sending: {send_error}") from None
                finally:
                    answer.cancel()
                    if answer.done() and not answer.cancelled():
                        answer.exception()  # retrieved: no "never retrieved" warning
                    await _close(writer)
        except TimeoutError:
            raise ClamdError(f"clamd at {self.address}: no complete scan reply within "
                             f"{self.timeout_s:g}s") from None
        if reply.endswith("ERROR"):
            raise ClamdError(f"clamd at {self.address}: {reply}")
        if not complete:  # never take an early answer for a verdict on the whole stream
            raise ClamdError(f"clamd at {self.address}: replied before the end of the stream "
                             f"({reply[:200]!r})")
        return reply

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, chunks: AsyncIterator[bytes],
                    answer: asyncio.Task[str]) -> tuple[bool, OSError | None]:
        """Send the INSTREAM command and chunks, stopping early when clamd has answered.
        Returns (whole stream sent, the send error if the connection broke)."""
        try:
            writer.write(b"zINSTREAM\0")
            async for chunk in chunks:
                if answer.done():
                    return False, None
                writer.write(struct.pack("!I", len(chunk)) + chunk)
                await writer.drain()
            if answer.done():
                return False, None
            writer.write(struct.pack("!I", 0))
            await writer.drain()
            return True, None
        except OSError as e:
            return False, e

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.address.path is not None:
                return await asyncio.open_unix_connection(self.address.path,
                                                          limit=MAX_REPLY_BYTES)
            return await asyncio.open_connection(self.address.host, self.address.port,
                                                 limit=MAX_REPLY_BYTES)
        except OSError as e:
            raise ClamdError(f"cannot connect to clamd at {self.address}: "
                             f"{e.strerror or e}") from None

    async def _reply(self, reader: asyncio.StreamReader) -> str:
        try:
            raw = await reader.readuntil(b"\0")
        except asyncio.IncompleteReadError as e:
            raise ClamdError(f"clamd at {self.address} closed the connection "
                             f"(partial reply {e.partial[:200]!r})") from None
        except asyncio.LimitOverrunError:
            raise ClamdError(f"clamd at {self.address}: reply too long") from None
        except OSError as e:
            raise ClamdError(f"clamd at {self.address}: {e.strerror or e}") from None
        return raw[:-1].decode("utf-8", "replace").strip()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def file_chunks(path: Path, limit: int, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
    """The first ``limit`` bytes of ``path``, ``chunk_bytes`` at a time, each read in a worker
    thread (the event loop never waits on the disk)."""
    f: BinaryIO = await asyncio.to_thread(path.open, "rb")
    try:
        left = limit
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(chunk_bytes, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()  # read-only: no flush, nothing that waits


def parse_reply(reply: str) -> str | None:
    """The signature name of a ``stream: NAME FOUND`` reply, None for ``stream: OK``;
    ClamdError for anything else."""
    _, sep, status = reply.partition(": ")
    if not sep:
        status = reply
    if status == "OK":
        return None
    if status.endswith(" FOUND"):
        name = _SIGNATURE.sub("_", status[: -len(" FOUND")].strip())[:200]
        return name or "unknown"
    raise ClamdError(f"unexpected clamd reply {reply[:200]!r}")


class ClamavFilter(Filter):
    name = "clamav"
    # on_error = "tempfail" (clamd down, timed out, or answering an error): a security
    # service is unavailable -> 4.7.1, as Postfix answers when a milter is (RFC 3463 X.7.x)
    error_reply = Reply(451, "4.7.1", "Virus scanner unavailable, try again later")

    def __init__(self, clamd: Clamd, stream_max_bytes: int, action: Action | None) -> None:
        self.clamd = clamd
        self.stream_max_bytes = stream_max_bytes
        self.action = action

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> ClamavFilter:
        check_keys(cfg, SETTINGS)
        text = opt_str(cfg, "address")
        if text is None:
            raise ConfigError("address", "is required (unix:/PATH, tcp:HOST:PORT or HOST:PORT)")
        try:
            address = ClamdAddress.parse(text)
        except ValueError as e:
            raise ConfigError("address", f"{text!r}: {e}") from None
        timeout_s = positive(cfg, "scan_timeout_s", 8.0)
        stream_max = integer(cfg, "stream_max_bytes", 25 * 1024 * 1024, minimum=1)
        chunk_bytes = integer(cfg, "chunk_bytes", 65536, minimum=1024)
        if chunk_bytes > 16 * 1024 * 1024:
            raise ConfigError("chunk_bytes", "must be at most 16777216")
        return cls(Clamd(address, timeout_s, chunk_bytes), stream_max, action_setting(cfg))

    async def ping(self) -> bool:
        """Readiness: True when clamd answers PONG."""
        return await self.clamd.ping()

    async def version(self) -> str:
        return await self.clamd.version()

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        truncated = msg.size > self.stream_max_bytes
        chunks = file_chunks(msg.path, self.stream_max_bytes, self.clamd.chunk_bytes)
        async with contextlib.aclosing(chunks):
            reply = await self.clamd.instream(chunks)
        virus = parse_reply(reply)
        hidden: str | None = None
        if virus is None:
            virus, hidden = await self.scan_hidden(msg)
        symbols: list[Symbol] = []
        verdict: Verdict | None = None
        if virus is None:
            symbols.append(Symbol("CLAMAV_CLEAN"))
        else:
            # a virus in a hidden file: its path as a second option (the log line shows it)
            symbols.append(Symbol("CLAMAV_VIRUS", (virus,) if hidden is None else
                                  (virus, hidden[:200])))
            if self.action is Action.REJECT:
                verdict = Verdict(Action.REJECT,
                                  Reply(554, "5.7.1", f"Message rejected: virus found: {virus}"),
                                  f"virus {virus}")
            elif self.action is not None:
                verdict = Verdict(self.action, None, f"virus {virus}")
        if truncated:
            symbols.append(Symbol("CLAMAV_TRUNCATED", (str(msg.size),)))
        scanned = min(msg.size, self.stream_max_bytes)
        data = {"virus": virus, "scanned_bytes": scanned, "truncated": truncated}
        if hidden is not None:
            data["hidden"] = hidden
        return Result(symbols=tuple(symbols), verdict=verdict, data=data)

    async def scan_hidden(self, msg: Message) -> tuple[str | None, str | None]:
        """(virus, the hidden file's path) for the first hidden file clamd finds a virus in,
        else (None, None)."""
        view = await mime.view(msg)
        files = await offload(msg.size, hidden_files, view, self.stream_max_bytes)
        for path, data in files:
            chunk = self.clamd.chunk_bytes
            reply = await self.clamd.instream(_bytes_chunks(data, chunk))
            virus = parse_reply(reply)
            if virus is not None:
                return virus, path
        return None, None


def hidden_files(view: mime.MimeView, max_bytes: int) -> list[tuple[str, bytes]]:
    """(path, content) of the files hidden in the message's parts, at most
    MAX_HIDDEN_SCANS."""
    out: list[tuple[str, bytes]] = []
    for part in view.parts:
        base = part.filename or f"part{part.index + 1}"
        for f in _hidden.hidden_files(part.content_type, part.payload, max_bytes):
            if f.data:
                out.append((f"{base}/{f.name or f.encoding}", f.data))
            if len(out) >= MAX_HIDDEN_SCANS:
                return out
    return out


async def _bytes_chunks(data: bytes, size: int) -> AsyncGenerator[bytes, None]:
    for at in range(0, len(data), size):
        yield data[at:at + size]
