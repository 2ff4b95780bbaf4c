"""DownstreamClient against the scriptable Sink: SMTP and LMTP transactions, dot-stuffing, reply
parsing, refusals at every step, transport failures and write coalescing."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypedDict

import pytest

from gateway.errors import RelayPermError, RelayTempError
from gateway.relay.client import WRITE_BUFFER, DownstreamClient, parse_reply
from gateway.replies import Reply
from tests.support.sink import Sink


class _Timeouts(TypedDict):
    connect_timeout_s: float
    command_timeout_s: float
    data_timeout_s: float


FAST = _Timeouts(connect_timeout_s=2.0, command_timeout_s=2.0, data_timeout_s=5.0)
MSG = b"From: a@x.test\r\nTo: b@x.test\r\nSubject: hi\r\n\r\nHello.\r\n"


async def _connect(sink: Sink, *, lmtp: bool = False, connect_timeout_s: float = 2.0,
                   command_timeout_s: float = 2.0, data_timeout_s: float = 5.0) -> DownstreamClient:
    return await DownstreamClient.connect(
        "127.0.0.1", sink.port, lmtp=lmtp, helo_name="mx.test",
        connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s,
        data_timeout_s=data_timeout_s)


async def _send(client: DownstreamClient, rcpts: list[str], chunks: object,
                sender: str = "a@x.test") -> list[Reply]:
    assert (await client.mail(sender)).code == 250
    accepted = sum([(await client.rcpt(r)).code == 250 for r in rcpts])
    return await client.data(chunks, accepted_rcpts=accepted)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- happy paths -------------------------------------------------------------------------------

def test_smtp_transaction_reaches_sink_exactly() -> None:
    async def go(sink: Sink) -> list[Reply]:
        client = await _connect(sink)
        assert not client.is_lmtp
        assert {"PIPELINING", "8BITMIME", "SIZE", "SMTPUTF8"} <= client.extensions.keys()
        assert await client.mail("a@x.test", ["BODY=8BITMIME", "SIZE=60"]) == Reply(
            250, "2.1.0", "Ok")
        assert (await client.rcpt("b@x.test", ["NOTIFY=NEVER"])).code == 250
        assert (await client.rcpt("c@x.test")).code == 250
        replies = await client.data([MSG[:10], MSG[10:]], accepted_rcpts=2)
        await client.quit()
        assert client.closed
        return replies

    with Sink() as sink:
        replies = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
        commands = sink.commands
    assert [(r.code, r.status) for r in replies] == [(250, "2.0.0")]  # SMTP: a single reply
    assert msg.helo == "mx.test"
    assert (msg.mail_from, msg.mail_params) == ("a@x.test", ("BODY=8BITMIME", "SIZE=60"))
    assert msg.rcpts == ("b@x.test", "c@x.test")
    assert msg.rcpt_params == (("NOTIFY=NEVER",), ())
    assert msg.raw == MSG and msg.data == MSG
    assert commands == ["EHLO mx.test", "MAIL FROM:<a@x.test> BODY=8BITMIME SIZE=60",
                        "RCPT TO:<b@x.test> NOTIFY=NEVER", "RCPT TO:<c@x.test>", "DATA", "QUIT"]


def test_lmtp_returns_one_reply_per_accepted_recipient_in_order() -> None:
    sink_replies = {"RCPT:nobody@x.test": "550 5.1.1 no such user",
                    "DATA_END:full@x.test": "452 4.2.2 mailbox full"}

    async def go(sink: Sink) -> tuple[list[Reply], list[Reply]]:
        client = await _connect(sink, lmtp=True)
        assert client.is_lmtp and "PIPELINING" in client.extensions
        await client.mail("")
        rc = [await client.rcpt(r) for r in ("a@x.test", "nobody@x.test", "full@x.test",
                                               "c@x.test")]
        replies = await client.data(iter([MSG]), accepted_rcpts=3)
        await client.quit()
        return rc, replies

    with Sink(lmtp=True, replies=sink_replies) as sink:
        rcpt_replies, replies = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
        commands = sink.commands
    assert [r.code for r in rcpt_replies] == [250, 550, 250, 250]
    assert rcpt_replies[1] == Reply(550, "5.1.1", "no such user")
    assert [(r.code, r.status) for r in replies] == [(250, "2.1.5"), (452, "4.2.2"),
                                                     (250, "2.1.5")]
    assert "<a@x.test>" in replies[0].text and "<c@x.test>" in replies[2].text
    assert commands[0] == "LHLO mx.test" and commands[1] == "MAIL FROM:<>"
    assert msg.mail_from == "" and msg.rcpts == ("a@x.test", "full@x.test", "c@x.test")
    assert msg.data == MSG


def test_lmtp_over_unix_socket() -> None:
    tmp = tempfile.mkdtemp(prefix="mg-sink-")  # short path: unix socket paths are limited
    path = os.path.join(tmp, "lmtp.sock")

    async def go() -> list[Reply]:
        client = await DownstreamClient.connect_unix(path, lmtp=True, helo_name="gw", **FAST)
        async with client:
            return await _send(client, ["a@x.test", "b@x.test"], [MSG])

    try:
        with Sink(lmtp=True, unix_path=path) as sink:
            replies = asyncio.run(go())
            [msg] = sink.wait_for(1)
            commands = sink.commands
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert [r.code for r in replies] == [250, 250]
    assert msg.helo == "gw" and msg.data == MSG
    assert commands[0] == "LHLO gw" and commands[-1] == "QUIT"


# -- dot-stuffing and termination --------------------------------------------------------------

DOTTY = b".starts with dot\r\nok\r\n.\r\n..two\r\nmid.dle\r\n.\r\n. space\r\nend\r\n"
DOTTY_STUFFED = (b"..starts with dot\r\nok\r\n..\r\n...two\r\nmid.dle\r\n..\r\n.. space\r\n"
                 b"end\r\n")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, len(DOTTY)])
def test_dot_stuffing_is_independent_of_chunk_boundaries(size: int) -> None:
    chunks = [DOTTY[i:i + size] for i in range(0, len(DOTTY), size)]

    async def go(sink: Sink) -> list[Reply]:
        async with await _connect(sink) as client:
            return await _send(client, ["b@x.test"], chunks)

    with Sink() as sink:
        replies = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
    assert replies[0].code == 250
    assert msg.raw == DOTTY_STUFFED
    assert msg.data == DOTTY


def test_dot_at_start_of_chunk_after_crlf_chunk_and_async_source() -> None:
    async def source() -> AsyncIterator[bytes]:
        for part in (b"line\r", b"\n", b".", b"hidden\r\n", b"x\r\n", b".\r\n", b"y\r\n"):
            yield part

    async def go(sink: Sink) -> None:
        async with await _connect(sink) as client:
            await _send(client, ["b@x.test"], source())

    with Sink() as sink:
        asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
    assert msg.raw == b"line\r\n..hidden\r\nx\r\n..\r\ny\r\n"
    assert msg.data == b"line\r\n.hidden\r\nx\r\n.\r\ny\r\n"


@pytest.mark.parametrize(("body", "raw"), [
    (b"Subject: x\r\n\r\nno final newline", b"Subject: x\r\n\r\nno final newline\r\n"),
    (b"abc\r\n.", b"abc\r\n..\r\n"),  # a trailing lone '.' must not end the data early
    (b"abc\r", b"abc\r\n"),
    (b"", b""),
    (b"\r\n", b"\r\n"),
])
def test_message_is_terminated_with_crlf(body: bytes, raw: bytes) -> None:
    async def go(sink: Sink) -> list[Reply]:
        async with await _connect(sink) as client:
            replies = await _send(client, ["b@x.test"], [body])
            # the connection is still in sync: a second transaction works
            replies += await _send(client, ["c@x.test"], [b"second\r\n"])
            return replies

    with Sink() as sink:
        replies = asyncio.run(go(sink))
        msgs = sink.wait_for(2)
    assert [r.code for r in replies] == [250, 250]
    assert msgs[0].raw == raw
    assert msgs[1].raw == b"second\r\n" and msgs[1].rcpts == ("c@x.test",)


def test_bare_lf_dot_cannot_end_data_early() -> None:
    """Input is supposed to be CRLF-clean; if it is not, a '.' after a bare LF is still stuffed,
    so a lenient downstream cannot be made to see a second, smuggled transaction."""
    smuggle = b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<spoof@evil.test>\r\nRCPT TO:<v@x.test>\r\n"

    async def go(sink: Sink) -> None:
        async with await _connect(sink) as client:
            await _send(client, ["b@x.test"], [smuggle])

    with Sink() as sink:
        asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
        time.sleep(0.05)
        messages, commands = sink.messages, sink.commands
    assert len(messages) == 1
    assert b"hi\n..\r\nMAIL FROM:<spoof" in msg.raw
    assert not any(c.startswith("MAIL FROM:<spoof") for c in commands)


def test_crlf_in_address_is_refused_before_anything_is_sent() -> None:
    async def go(sink: Sink) -> None:
        client = await _connect(sink)
        with pytest.raises(ValueError):
            await client.mail("a@x.test>\r\nRCPT TO:<spoof@evil.test")
        assert client.closed

    with Sink() as sink:
        asyncio.run(go(sink))
        time.sleep(0.05)
        commands = sink.commands
    assert commands == ["EHLO mx.test"]


# -- reply parsing -----------------------------------------------------------------------------

def test_multiline_replies_and_enhanced_codes_from_the_wire() -> None:
    sink_replies = {
        "MAIL": "250 sender fine",
        "RCPT:multi@x.test": "550-5.1.1 first line\n550-5.1.1 second line\n550 5.1.1 third",
        "RCPT:odd@x.test": "550 4.1.1 class does not match",
        "RCPT:bare@x.test": "451",
    }

    async def go(sink: Sink) -> list[Reply]:
        client = await _connect(sink)
        out = [await client.mail("a@x.test")]
        for r in ("multi@x.test", "odd@x.test", "bare@x.test", "ok@x.test"):
            out.append(await client.rcpt(r))
        await client.quit()
        return out

    with Sink(replies=sink_replies,
              ehlo_extensions=("SIZE 1000", "8bitmime", "AUTH PLAIN LOGIN")) as sink:
        replies = asyncio.run(go(sink))
    assert replies == [
        Reply(250, "2.0.0", "sender fine"),
        Reply(550, "5.1.1", "first line\nsecond line\nthird"),
        Reply(550, "5.0.0", "4.1.1 class does not match"),
        Reply(451, "4.0.0", ""),
        Reply(250, "2.1.5", "Ok"),
    ]


def test_ehlo_extensions_are_parsed() -> None:
    async def go(sink: Sink) -> dict[str, str]:
        async with await _connect(sink) as client:
            return client.extensions

    with Sink(ehlo_extensions=("SIZE 1000", "8bitmime", "AUTH PLAIN LOGIN")) as sink:
        ext = asyncio.run(go(sink))
    assert ext == {"SIZE": "1000", "8BITMIME": "", "AUTH": "PLAIN LOGIN"}


def test_parse_reply_rejects_malformed_lines() -> None:
    assert parse_reply(["354 go ahead"]) == Reply(354, "", "go ahead")
    for bad in (["hello"], ["250-a", "251 b"], ["250-a"], ["250 a", "250 b"], ["600 x"], [""]):
        with pytest.raises(ValueError):
            parse_reply(bad)


@pytest.mark.parametrize("garbage", ["hello there", "2500 no", "250-x\n550 changed code"])
def test_garbage_reply_raises_temp_error_and_closes(garbage: str) -> None:
    async def go(sink: Sink) -> None:
        client = await _connect(sink)
        with pytest.raises(RelayTempError) as ei:
            await client.mail("a@x.test")
        assert ei.value.code == 451 and ei.value.status.startswith("4.")
        assert "MAIL FROM" in str(ei.value) and f"127.0.0.1:{sink.port}" in str(ei.value)
        assert client.closed
        with pytest.raises(RelayTempError):
            await client.rset()

    with Sink(replies={"MAIL": garbage}) as sink:
        asyncio.run(go(sink))


# -- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("greeting", "kind", "code", "status", "text"), [
    ("421 4.3.2 busy", RelayTempError, 421, "4.3.2", "busy"),
    ("554 5.3.2 no service here", RelayPermError, 554, "5.3.2", "no service here"),
    ("450 later", RelayTempError, 450, "4.0.0", "later"),
])
def test_refused_greeting(greeting: str, kind: type[Exception], code: int, status: str,
                          text: str) -> None:
    async def go(sink: Sink) -> None:
        with pytest.raises(kind) as ei:
            await _connect(sink)
        err = ei.value
        assert isinstance(err, RelayTempError | RelayPermError)
        assert (err.code, err.status, err.text) == (code, status, text)
        assert f"127.0.0.1:{sink.port}" in str(err) and "greeting" in str(err)

    with Sink(greeting=greeting) as sink:
        asyncio.run(go(sink))
        commands = sink.commands
    assert not any(c.startswith("EHLO") for c in commands)


def test_ehlo_5xx_falls_back_to_helo_for_smtp() -> None:
    async def go(sink: Sink) -> dict[str, str]:
        async with await _connect(sink) as client:
            await _send(client, ["b@x.test"], [MSG])
            return client.extensions

    with Sink(replies={"EHLO": "502 5.5.1 EHLO not supported"}) as sink:
        ext = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
        commands = sink.commands
    assert ext == {}
    assert commands[:2] == ["EHLO mx.test", "HELO mx.test"]
    assert msg.helo == "mx.test" and msg.data == MSG


@pytest.mark.parametrize(("lmtp", "reply", "kind"), [
    (True, "500 5.5.1 what", RelayPermError),  # LMTP: no HELO fallback
    (False, "421 4.3.2 closing", RelayTempError),  # 4xx: no fallback either
])
def test_hello_refused(lmtp: bool, reply: str, kind: type[Exception]) -> None:
    async def go(sink: Sink) -> None:
        with pytest.raises(kind) as ei:
            await _connect(sink, lmtp=lmtp)
        assert isinstance(ei.value, RelayTempError | RelayPermError)
        assert ei.value.code == int(reply[:3]) and ei.value.status == reply[4:9]

    with Sink(lmtp=lmtp, replies={"LHLO" if lmtp else "EHLO": reply}) as sink:
        asyncio.run(go(sink))
        commands = sink.commands
    assert not any(c.startswith("HELO") for c in commands)


def test_data_command_refused_returns_reply_without_consuming_source() -> None:
    consumed: list[bytes] = []

    def source() -> Iterator[bytes]:
        consumed.append(MSG)
        yield MSG

    async def go(sink: Sink, lmtp: bool) -> tuple[list[Reply], Reply]:
        client = await _connect(sink, lmtp=lmtp)
        replies = await _send(client, ["a@x.test", "b@x.test"], source())
        rset = await client.rset()  # the connection is still usable
        await client.quit()
        return replies, rset

    for lmtp in (False, True):
        with Sink(lmtp=lmtp, replies={"DATA": "451 4.3.0 try later"}) as sink:
            replies, rset = asyncio.run(go(sink, lmtp))
            time.sleep(0.05)
            assert sink.messages == []
        assert replies == [Reply(451, "4.3.0", "try later")] * (2 if lmtp else 1)
        assert rset.code == 250
    assert consumed == []


def test_rejection_after_final_dot_is_returned() -> None:
    async def go(sink: Sink) -> list[Reply]:
        async with await _connect(sink) as client:
            return await _send(client, ["b@x.test"], [MSG])

    with Sink(replies={"DATA_END": "554 5.7.1 no"}) as sink:
        replies = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
    assert replies == [Reply(554, "5.7.1", "no")]
    assert msg.replies == ("554 5.7.1 no",)


def test_421_reply_closes_the_client() -> None:
    async def go(sink: Sink) -> None:
        client = await _connect(sink)
        assert await client.mail("a@x.test") == Reply(421, "4.3.2", "shutting down")
        assert client.closed
        with pytest.raises(RelayTempError) as ei:
            await client.rcpt("b@x.test")
        assert ei.value.status == "4.4.2"

    with Sink(replies={"MAIL": "421 4.3.2 shutting down"}) as sink:
        asyncio.run(go(sink))


def test_lmtp_connection_lost_mid_replies_pads_missing_with_tempfail() -> None:
    async def go(sink: Sink) -> list[Reply]:
        client = await _connect(sink, lmtp=True)
        replies = await _send(client, ["a@x.test", "b@x.test", "c@x.test"], [MSG])
        assert client.closed
        return replies

    with Sink(lmtp=True, replies={"DATA_END:b@x.test": "421 4.3.2 going down"}) as sink:
        replies = asyncio.run(go(sink))
    assert [(r.code, r.status) for r in replies] == [(250, "2.1.5"), (421, "4.3.2"),
                                                     (451, "4.4.2")]
    assert "after 2 of 3 replies" in replies[2].text and "end of data" in replies[2].text


# -- transport failures ------------------------------------------------------------------------

def test_drop_after_data_raises_temp_error() -> None:
    async def go(sink: Sink) -> None:
        client = await _connect(sink)
        with pytest.raises(RelayTempError) as ei:
            await _send(client, ["b@x.test"], [MSG])
        assert (ei.value.code, ei.value.status) == (451, "4.4.2")
        assert "end of data" in str(ei.value) and f"127.0.0.1:{sink.port}" in str(ei.value)
        assert client.closed
        await client.quit()  # never raises

    with Sink(drop_after_data=True) as sink:
        asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
    assert msg.data == MSG and msg.replies == ()


@pytest.mark.parametrize(("delay_on", "step"), [("MAIL", "MAIL FROM"), ("DATA_END", "end of data")])
def test_slow_downstream_times_out_quickly(delay_on: str, step: str) -> None:
    async def go(sink: Sink) -> float:
        client = await _connect(sink, command_timeout_s=0.3, data_timeout_s=0.3)
        t0 = time.monotonic()
        with pytest.raises(RelayTempError) as ei:
            await _send(client, ["b@x.test"], [MSG])
        elapsed = time.monotonic() - t0
        assert (ei.value.code, ei.value.status) == (451, "4.4.2")
        assert step in str(ei.value) and "timed out" in str(ei.value)
        assert client.closed
        return elapsed

    with Sink(delay_s=3.0, delay_on={delay_on}) as sink:
        elapsed = asyncio.run(go(sink))
    assert elapsed < 1.5


def test_greeting_timeout() -> None:
    async def go(sink: Sink) -> None:
        t0 = time.monotonic()
        with pytest.raises(RelayTempError) as ei:
            await _connect(sink, connect_timeout_s=0.3)
        assert time.monotonic() - t0 < 1.5
        assert ei.value.status == "4.4.2" and "greeting" in str(ei.value)

    with Sink(delay_s=3.0, delay_on={"GREETING"}) as sink:
        asyncio.run(go(sink))


def test_connect_refused_is_temp_error_4_4_1() -> None:
    port = _free_port()

    async def go() -> None:
        with pytest.raises(RelayTempError) as ei:
            await DownstreamClient.connect("127.0.0.1", port, **FAST)
        assert (ei.value.code, ei.value.status) == (451, "4.4.1")
        assert f"127.0.0.1:{port}" in str(ei.value) and "connect" in str(ei.value)
        assert not ei.value.permanent

    asyncio.run(go())


def test_source_error_propagates_and_closes() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield MSG
        raise OSError("spool file vanished")

    async def go(sink: Sink) -> None:
        client = await _connect(sink)
        with pytest.raises(OSError, match="spool file vanished"):
            await _send(client, ["b@x.test"], source())
        assert client.closed

    with Sink() as sink:
        asyncio.run(go(sink))
        time.sleep(0.05)
        assert sink.messages == []


# -- large messages ----------------------------------------------------------------------------

def test_large_message_is_written_in_coalesced_buffers() -> None:
    lines = [b"%05d " % i + b"x" * 44 + b"\r\n" for i in range(20_000)]
    lines[7_777] = b".leading dot on a line\r\n"
    body = b"".join(lines)
    assert len(body) >= 1_000_000

    async def go(sink: Sink) -> tuple[list[Reply], list[int], bytes]:
        client = await _connect(sink)
        assert (await client.mail("a@x.test")).code == 250
        assert (await client.rcpt("b@x.test")).code == 250
        writes: list[bytes] = []
        writer = client._writer
        real_write = writer.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            real_write(data)

        writer.write = counting_write  # type: ignore[method-assign]
        replies = await client.data(lines)  # one chunk per line: the worst case
        await client.quit()
        return replies, [len(w) for w in writes], writes[-2]

    with Sink() as sink:
        replies, sizes, last = asyncio.run(go(sink))
        [msg] = sink.wait_for(1)
    assert replies[0].code == 250
    assert msg.data == body
    assert msg.raw == body.replace(b"\r\n.leading", b"\r\n..leading")
    # writes: "DATA", the body in >= 64 KiB buffers, then "QUIT"
    data_sizes = sizes[1:-1]
    assert len(data_sizes) <= len(body) // WRITE_BUFFER + 1
    assert all(s >= WRITE_BUFFER for s in data_sizes[:-1])
    assert last.endswith(b"x\r\n.\r\n") and len(last) > 5  # final dot rides with the last data
    assert msg.reads < 1_000  # a write per line would show up as thousands of reads


# -- the sink itself ---------------------------------------------------------------------------

def test_sink_handles_pipelining_and_ends_data_only_at_crlf_dot_crlf() -> None:
    """The sink must not be laxer than a strict downstream, or smuggling tests would lie."""
    body = b"a\n.\nMAIL FROM:<spoof@evil.test>\r\nb\r.\r\nc\r\n..d\r\n"

    async def go(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            await reader.readuntil(b"\r\n")  # greeting
            writer.write(b"EHLO p\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
                         b"RCPT TO:<bad@x.test>\r\nDATA\r\n")
            got = b""
            while not got.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
                got += await reader.read(4096)
            writer.write(body + b".\r\nQUIT\r\n")
            got += await reader.read()  # until the sink closes after 221
        writer.close()
        return got

    with Sink(replies={"RCPT:bad@x.test": "550 5.1.1 no"}) as sink:
        wire = asyncio.run(go(sink.port))
        [msg] = sink.wait_for(1)
        transcript = sink.transcript
    codes = [line[:4] for line in wire.split(b"\r\n") if line]
    assert codes[-6:] == [b"250 ", b"250 ", b"550 ", b"354 ", b"250 ", b"221 "]
    assert msg.rcpts == ("b@x.test",)
    assert msg.raw == body and msg.data == body.replace(b"\r\n..d", b"\r\n.d")
    assert transcript == [b"EHLO p\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
                          b"RCPT TO:<bad@x.test>\r\nDATA\r\n" + body + b".\r\nQUIT\r\n"]


# -- the sink as a process ---------------------------------------------------------------------

def test_sink_process_writes_messages_to_dir(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.sink", "--port", "0", "--lmtp", "--dir",
         str(tmp_path), "--reply", "RCPT:bad@x.test=550 5.1.1 no such user"],
        cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first[0] == "PORT"
        port = int(first[1])

        async def go() -> list[Reply]:
            client = await DownstreamClient.connect("127.0.0.1", port, lmtp=True, **FAST)
            async with client:
                return await _send(client, ["a@x.test", "bad@x.test"], [MSG])

        replies = asyncio.run(go())
        deadline = time.monotonic() + 5
        while not (tmp_path / "000001.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(5)
    assert [r.code for r in replies] == [250]
    envelope = json.loads((tmp_path / "000001.json").read_text())
    assert envelope["mail_from"] == "a@x.test" and envelope["rcpts"] == ["a@x.test"]
    assert (tmp_path / envelope["data_file"]).read_bytes() == MSG


@pytest.mark.parametrize("pipelining", [True, False])
def test_envelope_pipelined_or_not_gives_the_same_replies(pipelining: bool) -> None:
    ext = ("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",)
    with Sink(ehlo_extensions=ext, replies={"RCPT:bad@x.test": "550 5.1.1 no such user"}) as sink:
        async def go() -> tuple[Reply, list[Reply], Reply]:
            client = await _connect(sink)
            mail, rcpts = await client.envelope(
                "s@x.test", ["BODY=8BITMIME"],
                [("a@x.test", []), ("bad@x.test", []), ("b@x.test", [])])
            after = await client.rset()  # the replies were all consumed: the stream is in step
            await client.quit()
            return mail, rcpts, after

        mail, rcpts, after = asyncio.run(go())
    assert mail.code == 250 and after.code == 250
    assert [r.code for r in rcpts] == [250, 550, 250]
    assert rcpts[1] == Reply(550, "5.1.1", "no such user")


def test_envelope_with_refused_mail_returns_no_rcpt_replies() -> None:
    with Sink(replies={"MAIL": "451 4.3.0 later"}) as sink:
        async def go() -> tuple[Reply, list[Reply], Reply]:
            client = await _connect(sink)
            mail, rcpts = await client.envelope("s@x.test", [], [("a@x.test", [])])
            after = await client.rset()
            await client.quit()
            return mail, rcpts, after

        mail, rcpts, after = asyncio.run(go())
    assert (mail.code, rcpts, after.code) == (451, [], 250)


def test_envelope_data_sends_mail_rcpts_and_data_in_one_group() -> None:
    # the sink answers nothing of a transaction until DATA is there: a client that waited
    # for the MAIL reply first would time out
    with Sink(hold_until="DATA", replies={"RCPT:bad@x.test": "550 5.1.1 no such user"}
              ) as sink:
        async def go() -> tuple[Reply, list[Reply], Reply, list[Reply]]:
            client = await _connect(sink)
            mail, rcpts, data = await client.envelope_data(
                "s@x.test", [], [("a@x.test", []), ("bad@x.test", []), ("b@x.test", [])])
            end = await client.after_data(data, [MSG], accepted_rcpts=2)
            assert not client.in_transaction
            again = await client.envelope_data("s@x.test", [], [("c@x.test", [])])
            end2 = await client.after_data(again[2], [MSG])
            await client.quit()
            return mail, rcpts, data, end + end2

        mail, rcpts, data, ends = asyncio.run(go())
        msgs = sink.wait_for(2)
    assert mail.code == 250 and [r.code for r in rcpts] == [250, 550, 250]
    assert data.code == 354 and [r.code for r in ends] == [250, 250]
    assert [m.rcpts for m in msgs] == [("a@x.test", "b@x.test"), ("c@x.test",)]
    assert msgs[0].data == MSG and msgs[1].data == MSG


def test_envelope_data_refused_data_leaves_the_transaction_to_reset() -> None:
    with Sink(replies={"DATA": "451 4.3.0 not now"}) as sink:
        async def go() -> tuple[Reply, list[Reply], bool, Reply]:
            client = await _connect(sink)
            _, _, data = await client.envelope_data("s@x.test", [], [("a@x.test", [])])
            ends = await client.after_data(data, [MSG])
            pending = client.in_transaction
            after = await client.rset()
            await client.quit()
            return data, ends, pending, after

        data, ends, pending, after = asyncio.run(go())
    assert data.code == 451 and ends == [data] and pending and after.code == 250
    assert sink.messages == []


@pytest.mark.parametrize("conforming", [True, False])
def test_envelope_data_without_an_accepted_rcpt_sends_no_message(conforming: bool) -> None:
    # RFC 2920 3.1: a server should refuse DATA when no RCPT was accepted; if it says 354 all
    # the same, the client ends the data at once with a lone dot
    with Sink(replies={"RCPT": "550 5.1.1 no such user"},
              data_without_rcpts=not conforming) as sink:
        async def go() -> tuple[Reply, Reply, bool]:
            client = await _connect(sink)
            _, rcpts, data = await client.envelope_data("s@x.test", [], [("a@x.test", [])])
            assert [r.code for r in rcpts] == [550]
            after = await client.rset()  # the stream is in step: the dot's reply was read
            closed = client.closed
            await client.quit()
            return data, after, closed

        data, after, closed = asyncio.run(go())
        assert after.code == 250 and not closed
        if conforming:
            assert data.code == 503 and sink.messages == []
        else:
            assert data.code == 354
            [msg] = sink.wait_for(1)
            assert msg.raw == b"" and msg.rcpts == ()
    assert sink.commands[-3:] == ["DATA", "RSET", "QUIT"]


def test_envelope_data_lmtp_without_an_accepted_rcpt_closes() -> None:
    with Sink(lmtp=True, replies={"RCPT": "550 5.1.1 no such user"},
              data_without_rcpts=True) as sink:
        async def go() -> tuple[Reply, bool]:
            client = await _connect(sink, lmtp=True)
            _, _, data = await client.envelope_data("s@x.test", [], [("a@x.test", [])])
            return data, client.closed

        data, closed = asyncio.run(go())
        assert data.code == 354 and closed and sink.messages == []


def test_envelope_data_needs_pipelining() -> None:
    with Sink(ehlo_extensions=("8BITMIME",)) as sink:
        async def go() -> None:
            client = await _connect(sink)
            try:
                await client.envelope_data("s@x.test", [], [("a@x.test", [])])
            finally:
                await client.quit()

        with pytest.raises(ValueError, match="PIPELINING"):
            asyncio.run(go())
    assert not any(c.startswith("MAIL") for c in sink.commands)
