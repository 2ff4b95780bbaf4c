"""Helpers shared by the unit tests of the filters that hand the message to a scanning daemon
(tests/filters/test_spamd.py, test_rspamd.py): corpus messages, symbols by name, a one-shot
fake server that records the request and answers with canned bytes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from gateway.filterapi import Result
from gateway.message import Message

GTUBE = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "gtube"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
T = TypeVar("T")


def message(tmp_path: Path, name: str) -> Message:
    """``shared/corpora/gtube/<name>`` with CRLF line ends, spooled in ``tmp_path``."""
    raw = re.sub(rb"\r?\n", b"\r\n", (GTUBE / name).read_bytes())
    path = tmp_path / name
    path.write_bytes(raw)
    return Message.from_spool(path, len(raw))


def by_name(res: Result) -> dict[str, tuple[tuple[str, ...], float | None]]:
    return {s.name: (s.options, s.score) for s in res.symbols}


def recording(seen: list[bytes], reply: bytes | None) -> Handler:
    """A server connection handler: reads one request (head, then ``Content-Length`` bytes of
    body, any case) into ``seen``, answers ``reply`` and closes; for ``reply=None`` it stays
    silent for 5 s instead."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        n = int(re.search(rb"(?i)Content-Length: (\d+)", head)[1])  # type: ignore[index]
        seen.append(head + await r.readexactly(n))
        if reply is None:
            await asyncio.sleep(5)
        w.write(reply or b"")
        await w.drain()
        w.close()
    return handler


def with_server(handler: Handler, use: Callable[[int], Awaitable[T]]) -> T:
    """Run ``use(port)`` while a server on 127.0.0.1:port serves ``handler``."""
    async def main() -> T:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await use(port)
    return asyncio.run(main())
