"""gateway/smtp/datareader.py puts the bytes after the end of DATA back into asyncio's
``StreamReader`` through its private ``_buffer`` (patch ``asyncio.streamreader-unread``). The
check finds a reader where that does not work; DATA is then read with the public
``readuntil`` and gives the same results (the reference model of test_datareader.py), the
pipelined commands after it included, with one warning line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from gateway import patches
from gateway.smtp import datareader
from gateway.smtp.datareader import DataStatus, read_data
from tests.unit.test_datareader import MODES, TRICKY, arun, check, run_on


@pytest.fixture
def line_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The check run again on a Python whose StreamReader keeps its data elsewhere (bytes
    "put back" land behind the rest); yields the warnings it logged."""
    status = dict(patches._status)
    monkeypatch.setattr(datareader, "_unread", lambda reader, data: reader.feed_data(data))
    patches.forget("asyncio.streamreader-unread")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                seen.append(record.getMessage())

    log = logging.getLogger("mailgate.patches")
    keep = Keep()
    log.addHandler(keep)
    try:
        monkeypatch.setattr(datareader, "UNREAD", patches.install(
            "asyncio.streamreader-unread", datareader.check_unread))
        yield seen
    finally:
        log.removeHandler(keep)
        patches._status.clear()
        patches._status.update(status)


def test_the_fast_path_is_checked_and_used_here() -> None:
    assert datareader.UNREAD and datareader.check_unread() is None


def test_a_reader_that_cannot_take_bytes_back_is_read_line_by_line(line_mode) -> None:
    assert line_mode == ["patch asyncio.streamreader-unread disabled, the library's own path "
                         "is used: bytes put back came out as b'TA\\r\\n\\r\\n.\\r\\nQUIT\\r\\nDA'"]
    assert datareader.UNREAD is False

    async def main() -> None:
        for wire in TRICKY:
            for mode in MODES:
                check(await run_on(wire, mode=mode), wire, mode=mode)

    arun(main())


def test_pipelined_commands_and_long_lines_in_line_mode(line_mode) -> None:
    body = b"Subject: hi\r\n\r\n" + b"x" * 200_000 + b"\r\n.stuffed\r\n"
    wire = body + b".\r\nMAIL FROM:<b@example.org>\r\nQUIT\r\n"

    async def main() -> None:
        reader = asyncio.StreamReader(limit=64 * 1024)
        reader.feed_data(wire)
        got = bytearray()
        loop = asyncio.get_running_loop()
        out = await read_data(reader, got.extend, max_message_bytes=10**6,
                              max_line_bytes=300_000, idle_timeout_s=5,
                              deadline=loop.time() + 10)
        assert out.status is DataStatus.OK and out.wire_bytes == len(body) + 3
        assert bytes(got) == body.replace(b"\r\n.stuffed", b"\r\nstuffed")
        assert await reader.readuntil(b"\n") == b"MAIL FROM:<b@example.org>\r\n"
        assert await reader.readuntil(b"\n") == b"QUIT\r\n"

    arun(main())
