"""Tests of gateway.smtp.datareader: end of data, smuggling variants, block boundaries, limits,
pushback into the StreamReader, bounded memory, timeouts, and a randomized comparison against a
byte-at-a-time reference implementation."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import tracemalloc
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar, cast

import pytest

from gateway.deadline import Deadline
from gateway.errors import MailgateError
from gateway.smtp.datareader import (
    BLOCK_SIZE,
    DataEOF,
    DataOutcome,
    DataStatus,
    DataTimeout,
    DataTooSlow,
    _unread,
    read_data,
)

Mode = Literal["reject", "normalize"]
MODES: tuple[Mode, ...] = ("reject", "normalize")
T = TypeVar("T")

# --------------------------------------------------------------------------- reference model


@dataclass(frozen=True)
class Expected:
    status: DataStatus
    content: bytes  # the full content after unstuffing/normalizing
    wire_bytes: int
    bare_lf: int
    bare_cr: int
    longest_line: int


def reference(wire: bytes, *, mode: Mode, max_message_bytes: int,
              max_line_bytes: int) -> Expected | None:
    """Obviously-correct byte-at-a-time model of the DATA rules; None when no terminator."""
    out = bytearray()
    line = longest = bare_lf = bare_cr = 0
    after_wire_crlf = True  # the first DATA line counts as preceded by CRLF
    at_line_start = True
    i = 0
    while True:
        if after_wire_crlf and wire[i:i + 3] == b".\r\n":
            consumed = i + 3
            break
        if i >= len(wire):
            return None
        c = wire[i:i + 1]
        if c == b"\r":
            if i + 1 >= len(wire):
                return None  # cannot tell yet whether this CR is bare
            crlf = wire[i + 1:i + 2] == b"\n"
            if not crlf:
                bare_cr += 1
            out += b"\r\n"
            longest = max(longest, line)
            line = 0
            i += 2 if crlf else 1
            after_wire_crlf = crlf
            at_line_start = True
            continue
        if c == b"\n":  # an LF not consumed as part of CRLF is bare
            bare_lf += 1
            out += b"\r\n"
            longest = max(longest, line)
            line = 0
            i += 1
            after_wire_crlf = False
            at_line_start = True
            continue
        if not (c == b"." and at_line_start):  # a line-initial dot is unstuffed
            out += c
            line += 1
        longest = max(longest, line)
        i += 1
        after_wire_crlf = at_line_start = False
    if mode == "reject" and (bare_lf or bare_cr):
        status = DataStatus.BARE_NEWLINE
    elif len(out) > max_message_bytes:
        status = DataStatus.TOO_BIG
    elif longest > max_line_bytes:
        status = DataStatus.LINE_TOO_LONG
    else:
        status = DataStatus.OK
    return Expected(status, bytes(out), consumed, bare_lf, bare_cr, longest)


# --------------------------------------------------------------------------- harness


class CutReader(asyncio.StreamReader):
    """A real StreamReader whose read() never returns bytes across the given stream offsets,
    so that read_data sees exactly the block boundaries a test asks for."""

    def __init__(self, cuts: Iterable[int] = ()) -> None:
        super().__init__()
        self._cuts = sorted(set(cuts))
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        nxt = next((c for c in self._cuts if c > self._pos), None)
        if nxt is not None and n > 0:
            n = min(n, nxt - self._pos)
        data = await super().read(n)
        self._pos += len(data)
        return data


@dataclass(frozen=True)
class Run:
    outcome: DataOutcome
    written: bytes
    pieces: int
    leftover: bytes  # what the caller can read from the same StreamReader afterwards


async def run_on(wire: bytes, *, cuts: Iterable[int] = (), mode: Mode = "reject",
                 max_message_bytes: int = 10**7, max_line_bytes: int = 998) -> Run:
    reader = CutReader(cuts)
    reader.feed_data(wire)
    reader.feed_eof()
    sink: list[bytes] = []
    loop = asyncio.get_running_loop()
    outcome = await read_data(reader, sink.append, max_message_bytes=max_message_bytes,
                              max_line_bytes=max_line_bytes, bare_newline=mode,
                              idle_timeout_s=5, deadline=loop.time() + 30)
    leftover = await asyncio.wait_for(reader.read(), 5)
    return Run(outcome, b"".join(sink), len(sink), leftover)


def run(wire: bytes, *, cuts: Iterable[int] = (), mode: Mode = "reject",
        max_message_bytes: int = 10**7, max_line_bytes: int = 998) -> Run:
    return asyncio.run(run_on(wire, cuts=cuts, mode=mode, max_message_bytes=max_message_bytes,
                              max_line_bytes=max_line_bytes))


def arun(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def crlf_clean(data: bytes) -> bool:
    return data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def check(r: Run, wire: bytes, *, mode: Mode, max_message_bytes: int = 10**7,
          max_line_bytes: int = 998) -> None:
    """Assert that a run agrees with the reference model."""
    exp = reference(wire, mode=mode, max_message_bytes=max_message_bytes,
                    max_line_bytes=max_line_bytes)
    assert exp is not None
    o = r.outcome
    assert (o.status, o.wire_bytes, o.bare_lf, o.bare_cr, o.longest_line) == (
        exp.status, exp.wire_bytes, exp.bare_lf, exp.bare_cr, exp.longest_line)
    assert r.leftover == wire[exp.wire_bytes:]
    assert o.size == len(r.written)
    if exp.status is DataStatus.OK:
        assert r.written == exp.content
    else:
        assert exp.content.startswith(r.written)
        assert o.size <= max_message_bytes
    assert crlf_clean(r.written)


# --------------------------------------------------------------------------- basics


def test_normal_message_and_pipelined_commands_stay_readable() -> None:
    body = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\nworld\r\n"
    wire = body + b".\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"

    async def main() -> tuple[DataOutcome, bytes, bytes, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        sink = bytearray()
        loop = asyncio.get_running_loop()
        outcome = await read_data(reader, sink.extend, max_message_bytes=10**6,
                                  idle_timeout_s=1, deadline=loop.time() + 5)
        first = await asyncio.wait_for(reader.readuntil(b"\n"), 1)
        second = await asyncio.wait_for(reader.readuntil(b"\n"), 1)
        return outcome, bytes(sink), first, second

    outcome, content, first, second = arun(main())
    assert outcome == DataOutcome(DataStatus.OK, len(body), len(body) + 3, 0, 0, 19)
    assert content == body
    assert first == b"MAIL FROM:<b@example.org>\r\n"
    assert second == b"RCPT TO:<c@example.org>\r\n"


def test_empty_message() -> None:
    r = run(b".\r\nQUIT\r\n")
    assert r.outcome == DataOutcome(DataStatus.OK, 0, 3, 0, 0, 0)
    assert r.written == b"" and r.pieces == 0
    assert r.leftover == b"QUIT\r\n"


def test_single_empty_line() -> None:
    r = run(b"\r\n.\r\n")
    assert r.outcome == DataOutcome(DataStatus.OK, 2, 5, 0, 0, 0)
    assert r.written == b"\r\n"


def test_dot_unstuffing() -> None:
    wire = b"..\r\n...x\r\n.a\r\nb.\r\n \r\n..\r\n.\r\n"
    r = run(wire)
    assert r.written == b".\r\n..x\r\na\r\nb.\r\n \r\n.\r\n"
    assert r.outcome.status is DataStatus.OK
    assert r.outcome.wire_bytes == len(wire)
    assert r.outcome.longest_line == 3


def test_content_is_written_in_block_sized_pieces() -> None:
    line = b"x" * 76 + b"\r\n"
    body = line * 20000  # ~1.5 MB
    r = run(body + b".\r\n")
    assert r.written == body
    assert r.pieces <= len(body) // BLOCK_SIZE + 2


# --------------------------------------------------------------------------- smuggling

SPOOF = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nspoofed"
REAL_END = b"\r\n.\r\n"
NEXT = b"QUIT\r\n"

# (name, wire bytes, contains a bare CR or LF)
SMUGGLING: list[tuple[str, bytes, bool]] = [
    (name, b"Subject: x\r\n\r\nbody" + seq + SPOOF + REAL_END + NEXT, bare)
    for name, seq, bare in [
        ("LF.LF", b"\n.\n", True),
        ("LF.CRLF", b"\n.\r\n", True),
        ("CRLF.LF", b"\r\n.\n", True),
        ("CR.CR", b"\r.\r", True),
        ("CRLF.CR", b"\r\n.\r", True),
        ("CRLF.CR-CRLF", b"\r\n.\r\r\n", True),
        ("CR.CRLF", b"\r.\r\n", True),
        ("LF.CR", b"\n.\r", True),
        ("CR-CR-LF.LF", b"\r\r\n.\n", True),
        ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", False),
        ("CRLF-SP.CRLF", b"\r\n .\r\n", False),
        ("CRLF..CRLF", b"\r\n..\r\n", False),
        ("CRLF.SP-CRLF", b"\r\n. \r\n", False),
    ]
] + [
    ("start .LF", b".\n" + SPOOF + REAL_END + NEXT, True),
    ("start LF.CRLF", b"\n.\r\n" + SPOOF + REAL_END + NEXT, True),
    ("start CR.CRLF", b"\r.\r\n" + SPOOF + REAL_END + NEXT, True),
    ("start .CR", b".\r" + SPOOF + REAL_END + NEXT, True),
]


@pytest.mark.parametrize(("name", "wire", "bare"), SMUGGLING, ids=[s[0] for s in SMUGGLING])
def test_malformed_end_of_data_never_ends_data(name: str, wire: bytes, bare: bool) -> None:
    for mode in MODES:
        r = run(wire, mode=mode)
        check(r, wire, mode=mode)
        assert r.leftover == NEXT  # only what follows the real CRLF.CRLF is left for the caller
        assert b"MAIL FROM" not in r.leftover
        assert r.outcome.wire_bytes == len(wire) - len(NEXT)
        if mode == "reject":
            assert r.outcome.status is (DataStatus.BARE_NEWLINE if bare else DataStatus.OK)
            if bare:
                assert b"MAIL FROM" not in r.written
        else:
            assert r.outcome.status is DataStatus.OK
            assert b"MAIL FROM:<ceo@bank.example>\r\n" in r.written
            assert crlf_clean(r.written)
            assert (r.outcome.bare_lf + r.outcome.bare_cr > 0) is bare


def test_bare_cr_before_real_terminator_is_a_real_end() -> None:
    # "\r\r\n.\r\n" contains a genuine CRLF.CRLF: DATA ends there, whatever precedes it.
    wire = b"body\r\r\n.\r\n" + NEXT
    r = run(wire, mode="reject")
    assert r.outcome.status is DataStatus.BARE_NEWLINE and r.outcome.bare_cr == 1
    assert r.leftover == NEXT
    r = run(wire, mode="normalize")
    assert r.outcome.status is DataStatus.OK
    assert r.written == b"body\r\n\r\n"
    assert r.leftover == NEXT


def test_normalize_rules() -> None:
    r = run(b"a\nb\rc\r\r\nd\n.\n..e\r.\r\n.\r\n", mode="normalize")
    # bare LF/CR become CRLF; lines after them are unstuffed; the lone dot is content (empty)
    assert r.written == b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n.e\r\n\r\n"
    assert (r.outcome.bare_lf, r.outcome.bare_cr) == (3, 3)
    assert r.outcome.status is DataStatus.OK


def test_reject_stops_writing_at_first_bare_newline() -> None:
    good = b"x" * 100 + b"\r\n"
    wire = good * 2000 + b"oops\n" + good * 2000 + b".\r\n"
    r = run(wire, mode="reject")
    assert r.outcome.status is DataStatus.BARE_NEWLINE
    assert r.outcome.bare_lf == 1
    assert r.written == (good * 2000)[:len(r.written)]
    assert len(r.written) < len(good) * 2000
    assert r.outcome.wire_bytes == len(wire)


# --------------------------------------------------------------------------- block boundaries

TRICKY: list[bytes] = [
    b".\r\nNEXT",
    b"\r\n.\r\nNEXT",
    b"a\r\n.\r\nNEXT",
    b"..\r\n.\r\nNEXT",
    b"a\r\r\n.\r\nNEXT",
    b"a\r\n.\r\r\n.\r\nNEXT",
    b"a\n.\nb\r.\r\n.\r.\r\n.\r\nNEXT",
    b"x\r\n..\r\n.x\r\n\r\n\r\n.\r\n.\r\nNEXT",
    b"\r\r\r\n\n\n\r.\r\n.\r\nNEXT",
    b".\n.\r.\r\n\r\n.\r\nMAIL FROM:<a@b>\r\n",
    b"line one\r\n.stuffed\r\n\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
]


@pytest.mark.parametrize("wire", TRICKY)
def test_every_single_split_gives_identical_results(wire: bytes) -> None:
    async def main() -> None:
        for mode in MODES:
            whole = await run_on(wire, mode=mode)
            check(whole, wire, mode=mode)
            layouts = [[k] for k in range(1, len(wire))] + [list(range(1, len(wire) + 1))]
            for cuts in layouts:
                r = await run_on(wire, cuts=cuts, mode=mode)
                check(r, wire, mode=mode)
                assert r.outcome.status is whole.outcome.status, (mode, cuts)
                if whole.outcome.status is DataStatus.OK:
                    assert (r.outcome, r.written, r.leftover) == (
                        whole.outcome, whole.written, whole.leftover), (mode, cuts)

    arun(main())


def test_every_pair_of_splits() -> None:
    async def main() -> None:
        for wire in TRICKY[:9]:
            for mode in MODES:
                for i, j in itertools.combinations(range(1, len(wire)), 2):
                    check(await run_on(wire, cuts=[i, j], mode=mode), wire, mode=mode)

    arun(main())


# --------------------------------------------------------------------------- limits


def test_message_size_boundary() -> None:
    body = b"a" * 98 + b"\r\n"  # 100 content bytes
    wire = body + b".\r\n" + NEXT
    ok = run(wire, max_message_bytes=100)
    assert ok.outcome.status is DataStatus.OK and ok.outcome.size == 100
    big = run(wire, max_message_bytes=99)
    assert big.outcome.status is DataStatus.TOO_BIG
    assert big.outcome.size == 0 and big.written == b""
    assert big.leftover == NEXT and big.outcome.wire_bytes == len(wire) - len(NEXT)
    # unstuffed bytes do not count
    stuffed = b"." + body + b".\r\n"
    assert run(stuffed, max_message_bytes=100).outcome.status is DataStatus.OK


def test_too_big_stops_writing_but_consumes_to_the_terminator() -> None:
    line = b"y" * 98 + b"\r\n"
    wire = line * 10_000 + b".\r\n" + NEXT  # 1,000,000 content bytes
    r = run(wire, max_message_bytes=300_000)
    assert r.outcome.status is DataStatus.TOO_BIG
    assert 0 < r.outcome.size <= 300_000 and r.written == (line * 10_000)[:r.outcome.size]
    assert r.leftover == NEXT


def test_line_length_boundary() -> None:
    for max_line in (998, 1, 0, 5000):
        exact = b"z" * max_line + b"\r\n.\r\n"
        assert run(exact, max_line_bytes=max_line).outcome.status is DataStatus.OK
        assert run(exact, max_line_bytes=max_line).outcome.longest_line == max_line
        over = b"z" * (max_line + 1) + b"\r\n.\r\n" + NEXT
        r = run(over, max_line_bytes=max_line)
        assert r.outcome.status is DataStatus.LINE_TOO_LONG
        assert r.outcome.longest_line == max_line + 1
        assert r.leftover == NEXT and r.written == b""
    # a stuffed leading dot is not counted: 999 bytes on the wire, 998 of content
    stuffed = b"." + b"z" * 998 + b"\r\n.\r\n"
    r = run(stuffed)
    assert r.outcome.status is DataStatus.OK and r.outcome.longest_line == 998
    # a line that is long only across block boundaries is still caught
    long_wire = b"q" * (3 * BLOCK_SIZE) + b"\r\n.\r\n"
    r = run(long_wire, cuts=range(7, len(long_wire), 4093))
    assert r.outcome.status is DataStatus.LINE_TOO_LONG
    assert r.outcome.longest_line == 3 * BLOCK_SIZE


def test_status_priority() -> None:
    wire = b"w" * 2000 + b"\n" + b"v" * 2000 + b"\r\n.\r\n"
    # bare LF + too big + line too long
    assert run(wire, max_message_bytes=100).outcome.status is DataStatus.BARE_NEWLINE
    r = run(wire, max_message_bytes=100, mode="normalize")
    assert r.outcome.status is DataStatus.TOO_BIG
    r = run(wire, mode="normalize")
    assert r.outcome.status is DataStatus.LINE_TOO_LONG and r.outcome.longest_line == 2000
    # a problem late in the message still wins over one seen earlier
    late = b"w" * 2000 + b"\r\n" + b"u" * 10 + b"\r\n" * 100 + b"\r\r\n.\r\n"
    assert run(late).outcome.status is DataStatus.BARE_NEWLINE
    assert run(late, max_message_bytes=2050).outcome.status is DataStatus.BARE_NEWLINE


# --------------------------------------------------------------------------- pushback design


def test_unread_puts_bytes_in_front_of_the_streamreader_buffer() -> None:
    """Pins the StreamReader internals the pushback relies on."""

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"C\r\nD\r\n")
        _unread(reader, b"A\r\nB")
        assert await asyncio.wait_for(reader.readuntil(b"\n"), 1) == b"A\r\n"
        assert await asyncio.wait_for(reader.readuntil(b"\n"), 1) == b"BC\r\n"
        reader.feed_eof()
        _unread(reader, b"Z")
        assert await asyncio.wait_for(reader.read(), 1) == b"ZD\r\n"

    arun(main())


def test_pushback_keeps_order_when_the_reader_holds_more_than_one_block() -> None:
    tail = b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(20_000))  # > 3 blocks
    wire = b"short\r\n.\r\n" + tail
    r = run(wire)
    assert r.written == b"short\r\n"
    assert r.leftover == tail


def test_pushback_with_aiosmtpd_stream_limit_over_loopback() -> None:
    """aiosmtpd builds its StreamReader with limit=1001 (so flow control pauses at 2002 bytes)."""
    body = b"".join(b"line %06d " % i + b"p" * 60 + b"\r\n" for i in range(3000))
    pipelined = b"MAIL FROM:<next@example.org>\r\nRCPT TO:<r@example.org>\r\n"
    wire = body + b".\r\n" + pipelined

    async def main() -> None:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a, limit=1001)
        _, client = await asyncio.open_connection(sock=b)
        try:
            client.write(wire)
            await asyncio.wait_for(client.drain(), 5)
            sink = bytearray()
            loop = asyncio.get_running_loop()
            outcome = await read_data(reader, sink.extend, max_message_bytes=10**7,
                                      idle_timeout_s=5, deadline=loop.time() + 10)
            assert outcome.status is DataStatus.OK and bytes(sink) == body
            assert await asyncio.wait_for(reader.readuntil(b"\n"), 5) == pipelined[:30]
            assert await asyncio.wait_for(reader.readuntil(b"\n"), 5) == pipelined[30:]
        finally:
            client.close()
            writer.close()

    arun(main())


def test_smuggling_over_loopback_each_variant_written_in_one_go() -> None:
    async def main() -> None:
        for _name, wire, bare in SMUGGLING:
            a, b = socket.socketpair()
            reader, writer = await asyncio.open_connection(sock=a, limit=1001)
            _, client = await asyncio.open_connection(sock=b)
            try:
                client.write(wire)
                sink = bytearray()
                loop = asyncio.get_running_loop()
                outcome = await read_data(reader, sink.extend, max_message_bytes=10**6,
                                          idle_timeout_s=5, deadline=loop.time() + 10)
                expected = DataStatus.BARE_NEWLINE if bare else DataStatus.OK
                assert outcome.status is expected
                assert await asyncio.wait_for(reader.readuntil(b"\n"), 5) == NEXT
            finally:
                client.close()
                writer.close()

    arun(main())


# --------------------------------------------------------------------------- memory


def test_100mb_without_newline_is_consumed_in_bounded_memory() -> None:
    total = 100 * 1024 * 1024
    chunk = b"A" * (256 * 1024)

    async def main() -> tuple[DataOutcome, int, bytes]:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        _, client = await asyncio.open_connection(sock=b)
        received = 0

        def count(data: bytes) -> None:
            nonlocal received
            received += len(data)

        async def send() -> None:
            for _ in range(total // len(chunk)):
                client.write(chunk)
                await asyncio.wait_for(client.drain(), 30)
            client.write(b"\r\n.\r\nQUIT\r\n")
            await asyncio.wait_for(client.drain(), 30)

        try:
            sender = asyncio.create_task(send())
            loop = asyncio.get_running_loop()
            outcome = await read_data(reader, count, max_message_bytes=50 * 1024 * 1024,
                                      idle_timeout_s=10, deadline=loop.time() + 120)
            await asyncio.wait_for(sender, 30)
            rest = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
            return outcome, received, rest
        finally:
            client.close()
            writer.close()

    tracemalloc.start()
    try:
        outcome, received, rest = arun(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.status is DataStatus.TOO_BIG
    assert outcome.longest_line == total
    assert outcome.wire_bytes == total + 5
    assert received == outcome.size == 0  # one line longer than max_line: nothing is written
    assert rest == b"QUIT\r\n"
    assert peak < 4 * 1024 * 1024, peak


# --------------------------------------------------------------------------- timeouts and EOF


@pytest.mark.parametrize("scoped", [False, True])
def test_idle_timeout_raises_data_timeout(scoped: bool) -> None:
    async def main() -> float:
        reader = asyncio.StreamReader()
        reader.feed_data(b"partial line")
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DataTimeout) as info:
            await read_data(reader, lambda _: None, max_message_bytes=1000,
                            idle_timeout_s=0.05, deadline=start + 10,
                            scope=Deadline() if scoped else None)
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, MailgateError)
        return loop.time() - start

    assert 0.04 < arun(main()) < 2


@pytest.mark.parametrize("scoped", [False, True])
def test_deadline_raises_data_timeout_even_when_the_client_keeps_trickling(scoped: bool) -> None:
    async def main() -> float:
        reader = asyncio.StreamReader()

        async def trickle() -> None:
            for _ in range(200):
                reader.feed_data(b"x")
                await asyncio.sleep(0.01)

        feeder = asyncio.create_task(trickle())
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            with pytest.raises(DataTimeout):
                await read_data(reader, lambda _: None, max_message_bytes=1000,
                                idle_timeout_s=1, deadline=start + 0.15,
                                scope=Deadline() if scoped else None)
        finally:
            feeder.cancel()
        return loop.time() - start

    assert 0.1 < arun(main()) < 1


@pytest.mark.parametrize("scoped", [False, True])
def test_deadline_already_passed(scoped: bool) -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b".\r\n")
        loop = asyncio.get_running_loop()
        with pytest.raises(DataTimeout):
            await read_data(reader, lambda _: None, max_message_bytes=1000,
                            idle_timeout_s=1, deadline=loop.time() - 1,
                            scope=Deadline() if scoped else None)
        assert await asyncio.wait_for(reader.read(100), 1) == b".\r\n"  # nothing consumed

    arun(main())


@pytest.mark.parametrize("scoped", [False, True])
def test_protocol_timeout_error_is_not_mistaken_for_our_timeout(scoped: bool) -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.set_exception(TimeoutError(110, "Connection timed out"))
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError) as info:
            await read_data(reader, lambda _: None, max_message_bytes=1000,
                            idle_timeout_s=1, deadline=loop.time() + 5,
                            scope=Deadline() if scoped else None)
        assert not isinstance(info.value, DataTimeout)

    arun(main())


@pytest.mark.parametrize("wire", [b"", b"abc", b"abc\r\n", b"abc\r\n.", b"abc\r\n.\r",
                                  b"x\r", b".\r", b".", b"a\n.\n"])
def test_eof_before_terminator_raises_data_eof(wire: bytes) -> None:
    for mode in MODES:
        assert reference(wire, mode=mode, max_message_bytes=100, max_line_bytes=10) is None
        with pytest.raises(DataEOF) as info:
            run(wire, mode=mode)
        assert isinstance(info.value, ConnectionResetError)
        assert isinstance(info.value, EOFError) and isinstance(info.value, MailgateError)


def test_invalid_mode() -> None:
    with pytest.raises(ValueError):
        run(b".\r\n", mode=cast(Mode, "strict"))


# --------------------------------------------------------------------------- property test

TOKENS = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n..", b"\x00",
          b" ", b"\r\r\n", b"\n.\n", b"\r.\r", b"xyz" * 5, b"\xff"]


def random_wire(rng: random.Random) -> bytes:
    parts = [rng.choice(TOKENS) for _ in range(rng.randrange(0, 40))]
    if rng.random() < 0.1:
        parts.append(b"L" * rng.randrange(0, 3000))
    if rng.random() < 0.9:
        parts.append(b"\r\n.\r\n" if rng.random() < 0.8 else b".\r\n")
    parts.extend(rng.choice(TOKENS) for _ in range(rng.randrange(0, 6)))
    return b"".join(parts)


def test_random_messages_match_the_reference_model() -> None:
    rng = random.Random(20240517)

    async def main() -> int:
        compared = 0
        for _ in range(4000):
            wire = random_wire(rng)
            mode = rng.choice(MODES)
            max_msg = rng.choice([10**6, rng.randrange(0, 80)])
            max_line = rng.choice([998, rng.randrange(0, 12)])
            cuts = rng.sample(range(1, len(wire) + 1), k=min(len(wire), rng.randrange(0, 8)))
            if rng.random() < 0.1:
                cuts = list(range(1, len(wire) + 1))
            exp = reference(wire, mode=mode, max_message_bytes=max_msg, max_line_bytes=max_line)
            if exp is None:
                with pytest.raises(DataEOF):
                    await run_on(wire, cuts=cuts, mode=mode, max_message_bytes=max_msg,
                                 max_line_bytes=max_line)
                continue
            r = await run_on(wire, cuts=cuts, mode=mode, max_message_bytes=max_msg,
                             max_line_bytes=max_line)
            check(r, wire, mode=mode, max_message_bytes=max_msg, max_line_bytes=max_line)
            compared += 1
        return compared

    assert arun(main()) > 3000


def test_large_messages_with_cuts_near_block_edges_match_the_reference_model() -> None:
    rng = random.Random(7)
    tokens = [b"text " * 10, b"\r\n", b"\r\n.", b"\r\n..", b"\r", b"\n", b"."]
    weights = [40, 30, 3, 2, 1, 1, 2]

    async def main() -> None:
        for i in range(6):
            parts = rng.choices(tokens, weights, k=9000)
            if i % 2 == 0:  # half of them free of bare CR/LF, so that OK outputs get compared
                parts = [x for x in parts if x not in (b"\r", b"\n")]
            body = b"x" + b"".join(parts)
            while REAL_END in body:  # keep the real end of data at the end
                body = body.replace(REAL_END, b"\r\n..\r\n")
            wire = body + REAL_END + NEXT
            edges = range(BLOCK_SIZE, len(wire), BLOCK_SIZE)
            cuts = [e + d for e in edges for d in (rng.randrange(-5, 6),)]
            for mode in MODES:
                r = await run_on(wire, cuts=cuts, mode=mode)
                check(r, wire, mode=mode)
                assert r.leftover == NEXT

    arun(main())


def test_reference_model_sanity() -> None:
    exp = reference(b"..a\r\nb\n.\r\n.\r\n", mode="normalize", max_message_bytes=100,
                    max_line_bytes=100)
    assert exp is not None and exp.content == b".a\r\nb\r\n\r\n" and exp.bare_lf == 1
    assert reference(b"a\n.\n", mode="reject", max_message_bytes=9, max_line_bytes=9) is None
    assert reference(b"..a\r\nb\n.\r\n", mode="normalize", max_message_bytes=100,
                     max_line_bytes=100) is None


# --------------------------------------------------------------------------- minimum data rate


async def _feed(reader: asyncio.StreamReader, chunks: list[tuple[float, bytes]]) -> None:
    """Feed each chunk after its pause (seconds)."""
    for pause, chunk in chunks:
        await asyncio.sleep(pause)
        reader.feed_data(chunk)


def _read_rated(chunks: list[tuple[float, bytes]], *, rate: int, grace_s: float,
                scoped: bool = False) -> tuple[DataOutcome | DataTooSlow, float]:
    async def main() -> tuple[DataOutcome | DataTooSlow, float]:
        reader = asyncio.StreamReader()
        feeder = asyncio.create_task(_feed(reader, chunks))
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            got: DataOutcome | DataTooSlow = await read_data(
                reader, lambda _: None, max_message_bytes=10**8, idle_timeout_s=60,
                deadline=start + 60, scope=Deadline() if scoped else None,
                min_rate_bytes_per_s=rate, rate_grace_s=grace_s)
        except DataTooSlow as e:
            got = e
        finally:
            feeder.cancel()
        return got, loop.time() - start

    return arun(main())


@pytest.mark.parametrize("scoped", [False, True])
def test_a_dribbler_below_the_minimum_rate_is_cut_after_about_the_grace(scoped: bool) -> None:
    """10 bytes/s against a floor of 100: the credit (0.5 s) drains at 0.9 s per second, so
    the cut comes at ~0.55 s, long before the idle timeout or the deadline (60 s)."""
    got, took = _read_rated([(0.1, b"x")] * 100, rate=100, grace_s=0.5, scoped=scoped)
    assert isinstance(got, DataTooSlow) and isinstance(got, DataTimeout), got
    assert 0.45 < took < 3, took
    assert 3 <= got.wire_bytes <= 30 and "below 100 bytes/s" in str(got)


def test_credit_is_capped_at_the_grace_so_a_fast_start_buys_no_long_stall() -> None:
    """1 MB at once would earn 10000 s at 100 B/s; at most the grace (0.5 s) is banked, so
    the silence after it is cut after ~0.5 s (the idle timeout is 60 s)."""
    got, took = _read_rated([(0, b"y" * 1_000_000)], rate=100, grace_s=0.5)
    assert isinstance(got, DataTooSlow), got
    assert 0.45 < took < 3, took


def test_a_client_steadily_above_the_floor_is_never_cut() -> None:
    """300 bytes/s against a floor of 100, in gaps shorter than the grace, for ~3 s (six
    graces): the whole message is read."""
    chunks = [(0.1, b"z" * 28 + b"\r\n")] * 30 + [(0.1, b".\r\n")]
    got, took = _read_rated(chunks, rate=100, grace_s=0.5)
    assert isinstance(got, DataOutcome) and got.status is DataStatus.OK, got
    assert got.size == 30 * 30 and took > 2.5


def test_no_minimum_rate_keeps_the_old_behaviour() -> None:
    got, _ = _read_rated([(0.3, b"x")] * 3 + [(0, b"\r\n.\r\n")], rate=0, grace_s=0.1)
    assert isinstance(got, DataOutcome) and got.size == 5
