"""Every ``[limits]`` setting, enforced on a real gateway process over raw loopback sockets.

Each test uses small values so it runs fast, asserts the exact reply (code and RFC 3463 enhanced
status code), that nothing reached the downstream for refused mail, and that the gateway keeps
serving afterwards.
"""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.smtpclient import RawSmtpClient
from tests.support.trickle import trickle_until_answer

SENDER = "bob@sender.test"
RCPT = "alice@example.test"
BODY = (b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: limits\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <l@sender.test>\r\n\r\nhello\r\n")
QID_RE = re.compile(r"\(([0-9A-Z]{16})\)$")


def start_transaction(c: RawSmtpClient, rcpts: tuple[str, ...] = (RCPT,)) -> None:
    assert c.cmd("EHLO client.test").split("\n")[-1].startswith("250 ")
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Recipient ok"


def send_message(c: RawSmtpClient, body: bytes = BODY) -> str:
    """DATA + body + final dot; returns the final reply line."""
    assert c.cmd("DATA").startswith("354 ")
    c.send(body + b".\r\n")
    return c.reply_lines()[-1]


def deliver_one(gw: GatewayProcess) -> str:
    """A complete, accepted transaction on a new connection: the gateway still serves."""
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        final = send_message(c)
        assert final.startswith("250 2.0.0 Ok: queued as "), final
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    return final.rsplit(" ", 1)[1]


def limits_policy(**limits: Any) -> dict[str, Any]:
    return base_policy(limits=limits)


def rss_kib(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def connection_events(gw: GatewayProcess, n: int) -> list[dict[str, Any]]:
    gw.wait_for(lambda e: len(gw.events("connection")) >= n)
    return gw.events("connection")


# -- connections ---------------------------------------------------------------------------------

def test_max_connections(gateway_factory):
    gw = gateway_factory(limits_policy(max_connections=2, max_connections_per_ip=10))
    c1, c2 = RawSmtpClient(gw.address), RawSmtpClient(gw.address)
    try:
        assert c1.greeting.startswith("220 mx.gateway.test ")
        assert c2.greeting.startswith("220 mx.gateway.test ")
        with RawSmtpClient(gw.address, source="127.0.0.3", greet=False) as c3:
            assert re.fullmatch(r"421 4.3.2 Too many connections, try again later \(S[0-9A-Z]{15}\)", c3.reply())
            assert c3.closed()
        assert c2.cmd("NOOP") == "250 2.0.0 Ok"  # the admitted ones are unaffected
        c1.close()
        connection_events(gw, 2)  # c3 refused, c1 ended: its slot is free again
        with RawSmtpClient(gw.address) as c4:
            assert c4.greeting.startswith("220 ")
            assert c4.cmd("QUIT") == "221 2.0.0 Bye"
        assert c2.cmd("QUIT") == "221 2.0.0 Bye"
    finally:
        c1.close()
        c2.close()
    ends = [e["end"] for e in connection_events(gw, 4)]
    assert ends.count("connection-limit") == 1
    deliver_one(gw)


def test_the_open_file_limit_caps_connections_with_a_421_not_a_stall(tmp_path):
    """With RLIMIT_NOFILE at 330 (hard too, so it cannot be raised) and 10 deliveries at once,
    the gateway carries (330 - 256 - 3 × 10) // 2 = 22 sessions: the 23rd client gets 421 at
    once instead of the accept loop running out of descriptors; the start says so; a freed
    slot is usable again."""
    argv = ["prlimit", "--nofile=330:330", "--", sys.executable, "-m", "gateway", "run",
            "--policy", "policy.toml", "--log-format", "json", "--log-level", "info"]
    policy = base_policy(limits={"max_connections": 1000, "max_connections_per_ip": 1000},
                         queue={"max_active": 10})
    with GatewayProcess(tmp_path / "gw", policy, argv=argv) as gw:
        assert gw.events("listening")[0]["max_connections"] == 22
        assert "carries 22 connections, fewer than limits.max_connections (1000)" in \
            gw.log_path.read_text()
        held = [RawSmtpClient(gw.address) for _ in range(22)]
        try:
            assert all(c.greeting.startswith("220 ") for c in held)
            start = time.monotonic()
            with RawSmtpClient(gw.address, greet=False) as extra:
                assert extra.reply().startswith("421 4.3.2 Too many connections")
            assert time.monotonic() - start < 2
            held.pop().close()
            connection_events(gw, 2)
            deliver_one(gw)
        finally:
            for c in held:
                c.close()


def test_max_connections_per_ip(gateway_factory):
    gw = gateway_factory(limits_policy(max_connections=10, max_connections_per_ip=2))
    a1 = RawSmtpClient(gw.address, source="127.0.0.2")
    a2 = RawSmtpClient(gw.address, source="127.0.0.2")
    try:
        with RawSmtpClient(gw.address, source="127.0.0.2", greet=False) as a3:
            assert a3.reply().startswith("421 4.7.0 Too many connections from your address, "
                                         "try again later (S")
            assert a3.closed()
        # Another address has its own allowance.
        with RawSmtpClient(gw.address, source="127.0.0.3") as b1, \
                RawSmtpClient(gw.address, source="127.0.0.3") as b2:
            assert b1.greeting.startswith("220 ") and b2.greeting.startswith("220 ")
            assert b2.cmd("NOOP") == "250 2.0.0 Ok"
        assert a2.cmd("QUIT") == "221 2.0.0 Bye"
        assert a2.closed()
        connection_events(gw, 4)
        with RawSmtpClient(gw.address, source="127.0.0.2") as a4:
            assert a4.greeting.startswith("220 ")
            assert a4.cmd("NOOP") == "250 2.0.0 Ok"
        assert a1.cmd("NOOP") == "250 2.0.0 Ok"
    finally:
        a1.close()
        a2.close()
    refused = [e for e in gw.events("connection") if e["end"] == "connection-limit"]
    assert [e["client"] for e in refused] == ["127.0.0.2"]


# -- command lines --------------------------------------------------------------------------------

def test_max_command_line_bytes(gateway_factory):
    gw = gateway_factory(limits_policy(max_command_line_bytes=1024, max_invalid_commands=10))
    with RawSmtpClient(gw.address) as c:
        assert c.cmd("NOOP " + "x" * 593) == "250 2.0.0 Ok"  # 600 bytes with CRLF
        assert c.cmd("NOOP " + "x" * 1017) == "250 2.0.0 Ok"  # exactly 1024 with CRLF
        assert c.cmd("NOOP " + "x" * 1018) == "500 5.5.2 Line too long"  # 1025
        assert c.cmd("NOOP " + "x" * 1093) == "500 5.5.2 Line too long"  # 1100
        # 1 MB without a line end: no reply (and no crash) until the line ends.
        c.send(b"NOOP " + b"y" * (1 << 20))
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.sock.recv(1)
        c.sock.settimeout(5)
        c.send(b"\r\n")
        assert c.reply() == "500 5.5.2 Line too long"
        # The session goes on, and so does the next transaction.
        start_transaction(c)
        assert send_message(c).startswith("250 2.0.0 Ok: queued as ")
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert len(gw.maildir_messages()) == 1
    deliver_one(gw)


# -- DATA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, ok", [
    (b"a" * 998, True),
    (b".." + b"b" * 997, True),  # dot-stuffed: 998 octets of content
    (b"a" * 999, False),
    (b"c" * 5000, False),
], ids=["998", "998-dot-stuffed", "999", "5000"])
def test_max_line_bytes_in_data(gateway_factory, line, ok):
    gw = gateway_factory(limits_policy(max_line_bytes=1000))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        final = send_message(c, BODY + line + b"\r\nend\r\n")
        if ok:
            assert final.startswith("250 2.0.0 Ok: queued as "), final
            [msg] = gw.maildir_messages()
            content = line[1:] if line.startswith(b".") else line
            assert b"\r\n" + content + b"\r\nend\r\n" in msg
        else:
            assert re.fullmatch(r"500 5\.6\.0 Line too long \(limit 1000 bytes with CRLF, "
                                r"RFC 5321 4\.5\.3\.1\.6\) \([0-9A-Z]{16}\)", final), final
            assert gw.maildir_messages() == []
        # Same connection: the next message goes through.
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{RCPT}>") == "250 2.1.5 Recipient ok"
        assert send_message(c).startswith("250 2.0.0 ")
    assert len(gw.maildir_messages()) == (2 if ok else 1)


def test_max_message_bytes_size_parameter(gateway_factory):
    gw = gateway_factory(limits_policy(max_message_bytes=10000))
    with RawSmtpClient(gw.address) as c:
        c.send("EHLO client.test\r\n")
        assert "250-SIZE 10000" in c.reply_lines()
        assert re.fullmatch(r"552 5\.3\.4 Message size exceeds fixed limit of 10000 bytes "
                            r"\([0-9A-Z]{16}\)", c.cmd(f"MAIL FROM:<{SENDER}> SIZE=10001"))
        assert re.fullmatch(r"552 5\.3\.4 Message size exceeds fixed limit of 10000 bytes "
                            r"\([0-9A-Z]{16}\)", c.cmd(f"MAIL FROM:<{SENDER}> SIZE=99999999999999999999"))
        # Refused MAIL opened no transaction.
        assert c.cmd(f"RCPT TO:<{RCPT}>") == "503 5.5.1 Need MAIL command"
        assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE=10000") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{RCPT}>") == "250 2.1.5 Recipient ok"
        assert send_message(c).startswith("250 2.0.0 ")
    assert len(gw.maildir_messages()) == 1


def _body_of_size(n: int) -> bytes:
    """A message whose DATA content is exactly ``n`` bytes (final CRLF included)."""
    head = BODY
    rest = n - len(head)
    lines = []
    while rest > 0:
        take = min(rest, 500)
        lines.append(b"z" * (take - 2) + b"\r\n" if take >= 2 else b"\r\n"[:take])
        rest -= take
    body = head + b"".join(lines)
    assert len(body) == n and body.endswith(b"\r\n")
    return body


def test_max_message_bytes_exact_boundary(gateway_factory):
    gw = gateway_factory(limits_policy(max_message_bytes=10000))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        assert send_message(c, _body_of_size(10000)).startswith("250 2.0.0 ")
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{RCPT}>") == "250 2.1.5 Recipient ok"
        final = send_message(c, _body_of_size(10001))
        assert re.fullmatch(r"552 5\.3\.4 Message size exceeds fixed limit of 10000 bytes "
                            r"\([0-9A-Z]{16}\)", final), final
    [msg] = gw.maildir_messages()
    assert msg.endswith(_body_of_size(10000)[len(BODY):])


def test_max_message_bytes_real_size_without_size_parameter(gateway_factory):
    gw = gateway_factory(limits_policy(max_message_bytes=100_000))
    big = 40 << 20  # 40 MiB streamed at a gateway that takes 100 kB
    with RawSmtpClient(gw.address, timeout=30) as c:
        start_transaction(c)
        before = rss_kib(gw)
        assert c.cmd("DATA").startswith("354 ")
        line = b"x" * 998 + b"\r\n"
        block = line * ((1 << 20) // len(line))
        c.send(BODY)
        sent = len(BODY)
        while sent < big:
            c.send(block)
            sent += len(block)
        c.send(b".\r\n")
        final = c.reply_lines()[-1]
        assert re.fullmatch(r"552 5\.3\.4 Message size exceeds fixed limit of 100000 bytes "
                            r"\(([0-9A-Z]{16})\)", final), final
        qid = QID_RE.search(final).group(1)
        grown = rss_kib(gw) - before
        assert grown < 16 * 1024, f"gateway grew by {grown} KiB for a refused 40 MiB message"
        # The session is still usable.
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{RCPT}>") == "250 2.1.5 Recipient ok"
        assert send_message(c).startswith("250 2.0.0 ")
    ev = gw.message_event(qid)
    assert ev["reply"] == final and ev["rcpts"] == [RCPT]
    assert len(gw.maildir_messages()) == 1
    connection_events(gw, 1)  # the session is over: no spool file is left behind
    assert list((gw.workdir / "spool" / "incoming").iterdir()) == []


# -- per transaction / per session counts ----------------------------------------------------------

def test_max_recipients(gateway_factory):
    gw = gateway_factory(limits_policy(max_recipients=3))
    rcpts = [f"u{i}@example.test" for i in range(1, 5)]
    with RawSmtpClient(gw.address) as c:
        start_transaction(c, tuple(rcpts[:3]))
        assert re.fullmatch(r"452 4\.5\.3 Too many recipients \([0-9A-Z]{16}\)",
                            c.cmd(f"RCPT TO:<{rcpts[3]}>"))
        final = send_message(c)
        assert final.startswith("250 2.0.0 Ok: queued as ")
        qid = final.rsplit(" ", 1)[1]
        # A new transaction gets a fresh allowance.
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{rcpts[3]}>") == "250 2.1.5 Recipient ok"
        assert send_message(c).startswith("250 2.0.0 ")
    ev = gw.message_event(qid)
    assert ev["rcpts"] == rcpts[:3] and ev["rcpt_refused"] == 1
    delivered = sorted(re.search(rb"Delivered-To: (\S+)", m).group(1).decode()
                       for m in gw.maildir_messages())
    assert delivered == sorted(rcpts)


def test_max_invalid_commands(gateway_factory):
    gw = gateway_factory(limits_policy(max_invalid_commands=3))
    with RawSmtpClient(gw.address) as c:
        assert c.cmd("FOO") == "500 5.5.2 Syntax error, command unrecognized"
        # a good command in between
        assert c.cmd("EHLO client.test").split("\n")[-1].startswith("250 ")
        assert c.cmd("MAIL TO:<x@y.test>") == "501 5.5.4 Syntax: MAIL FROM:<address>"
        c.send("BAR\r\n")
        assert c.reply() == "500 5.5.2 Syntax error, command unrecognized"
        assert re.fullmatch(r"421 4.7.0 Too many errors, closing connection \(S[0-9A-Z]{15}\)", c.reply())
        assert c.closed()
    ev = connection_events(gw, 1)[0]
    assert ev["end"] == "too-many-errors" and ev["invalid"] == 3
    deliver_one(gw)


def test_max_transactions_per_connection(gateway_factory):
    gw = gateway_factory(limits_policy(max_transactions_per_connection=2))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        assert send_message(c).startswith("250 2.0.0 ")
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RSET") == "250 2.0.0 Ok"  # an abandoned transaction counts too
        c.send(f"MAIL FROM:<{SENDER}>\r\n")
        assert re.fullmatch(r"421 4.7.0 Too many transactions, reconnect \(S[0-9A-Z]{15}\)", c.reply())
        assert c.closed()
    ev = connection_events(gw, 1)[0]
    assert ev["end"] == "too-many-transactions" and ev["transactions"] == 2
    assert len(gw.maildir_messages()) == 1
    deliver_one(gw)


# -- timeouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("after_ehlo", [False, True])
def test_idle_timeout(gateway_factory, after_ehlo):
    gw = gateway_factory(limits_policy(idle_timeout_s=1))
    with RawSmtpClient(gw.address) as c:
        if after_ehlo:
            assert c.cmd("EHLO client.test").split("\n")[-1].startswith("250 ")
        t0 = time.monotonic()
        assert re.fullmatch(r"421 4.4.2 Timeout, closing connection \(S[0-9A-Z]{15}\)", c.reply())
        waited = time.monotonic() - t0
        assert c.closed()
    assert 0.8 <= waited <= 3.0, waited
    assert connection_events(gw, 1)[0]["end"] == "idle-timeout"
    deliver_one(gw)


def test_idle_timeout_counts_from_the_last_command(gateway_factory):
    """The idle deadline applies to each command read on its own: a client that keeps talking
    (a NOOP every 0.6 s for 3 s, with idle_timeout_s = 1) is never cut off; once it stops, it
    gets the 421 one idle period later."""
    gw = gateway_factory(limits_policy(idle_timeout_s=1))
    with RawSmtpClient(gw.address) as c:
        assert c.greeting.startswith("220 ")
        for _ in range(5):
            time.sleep(0.6)
            assert c.cmd("NOOP").startswith("250 2.0.0"), "cut off while active"
        t0 = time.monotonic()
        assert c.reply().startswith("421 4.4.2 Timeout, closing connection (S")
        waited = time.monotonic() - t0
        assert c.closed()
    assert 0.8 <= waited <= 3.0, waited
    ev = connection_events(gw, 1)[0]
    assert ev["end"] == "idle-timeout" and ev["commands"] == 5


PLUGIN = textwrap.dedent('''
    """Test filters: one that sleeps at RCPT, one that sleeps at end of data."""
    import asyncio

    from gateway.filterapi import Filter, Result, Symbol


    class SlowRcpt(Filter):
        name = "slowrcpt"

        def __init__(self, delay_s):
            self.delay_s = delay_s

        @classmethod
        def from_config(cls, cfg, services):
            return cls(float(cfg.get("delay_s", 0)))

        async def on_rcpt(self, ctx):
            await asyncio.sleep(self.delay_s)
            return Result(symbols=(Symbol("SLOWRCPT_DONE"),))
''')


def slow_policy(tmp_path: Path, *, delay_s: float, timeout_s: float, on_error: str,
                **limits: Any) -> dict[str, Any]:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "slow.py").write_text(PLUGIN)
    # short relay steps: the RCPT budget is command_timeout_s plus the relay's own timeouts
    policy = base_policy(limits=limits, plugins={"dirs": [str(plugins)]},
                         relay={"connect_timeout_s": 0.1, "command_timeout_s": 0.1})
    policy["filters"] = [*policy["filters"], {"name": "slowrcpt", "delay_s": delay_s,
                                              "timeout_s": timeout_s, "on_error": on_error}]
    return policy


def test_command_timeout_with_slow_filter(gateway_factory, tmp_path):
    gw = gateway_factory(slow_policy(tmp_path, delay_s=4, timeout_s=10, on_error="tempfail",
                                     command_timeout_s=1))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c, ())
        t0 = time.monotonic()
        c.send(f"RCPT TO:<{RCPT}>\r\n")
        [line] = c.reply_lines()
        waited = time.monotonic() - t0
        assert c.closed()
    m = re.fullmatch(r"421 4\.4\.2 Timeout processing command \(([0-9A-Z]{16})\)", line)
    assert m, line
    assert 0.8 <= waited <= 3.0, waited
    ev = gw.message_event(m.group(1))  # the qid in the reply is the transaction's
    assert ev["rcpts"] == []
    assert connection_events(gw, 1)[0]["end"] == "command-timeout"
    assert gw.maildir_messages() == []
    assert any("exceeded its" in x and m.group(1) in x for x in gw.lines())


def test_filter_timeout_tempfail(gateway_factory, tmp_path):
    gw = gateway_factory(slow_policy(tmp_path, delay_s=3, timeout_s=0.3, on_error="tempfail",
                                     command_timeout_s=10))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c, ())
        t0 = time.monotonic()
        line = c.cmd(f"RCPT TO:<{RCPT}>")
        assert time.monotonic() - t0 < 2
        assert re.fullmatch(r"451 4\.3\.0 Temporary local problem, try again later "
                            r"\([0-9A-Z]{16}\)", line), line
        assert c.cmd("DATA") == "554 5.5.1 No valid recipients"
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert gw.maildir_messages() == []


def test_filter_timeout_continue(gateway_factory, tmp_path):
    gw = gateway_factory(slow_policy(tmp_path, delay_s=3, timeout_s=0.3, on_error="continue",
                                     command_timeout_s=10))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)  # 250 despite the filter's timeout
        final = send_message(c)
        assert final.startswith("250 2.0.0 Ok: queued as ")
    ev = gw.message_event(final.rsplit(" ", 1)[1])
    assert any(s.startswith("SLOWRCPT_ERROR") for s in ev["symbols"]), ev["symbols"]
    assert "SLOWRCPT_DONE" not in str(ev["symbols"])
    assert ev["filter_errors"] == {"slowrcpt": "timeout"}
    assert len(gw.maildir_messages()) == 1


def test_data_block_timeout(gateway_factory):
    gw = gateway_factory(limits_policy(data_block_timeout_s=1, data_timeout_s=30))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        assert c.cmd("DATA").startswith("354 ")
        c.send(BODY[:40])  # part of the header, then silence
        t0 = time.monotonic()
        [line] = c.reply_lines()
        waited = time.monotonic() - t0
        assert c.closed()
    m = re.fullmatch(r"421 4\.4\.2 Timeout during DATA \(([0-9A-Z]{16})\)", line)
    assert m, line
    assert 0.8 <= waited <= 3.0, waited
    assert gw.message_event(m.group(1))["action"] == "timeout"
    assert connection_events(gw, 1)[0]["end"] == "data-timeout"
    assert gw.maildir_messages() == []
    assert list((gw.workdir / "spool" / "incoming").iterdir()) == []
    deliver_one(gw)


def test_data_timeout_total_budget(gateway_factory):
    gw = gateway_factory(limits_policy(data_block_timeout_s=1, data_timeout_s=2))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        assert c.cmd("DATA").startswith("354 ")
        # one line every 0.3 s: never idle for a whole block timeout
        waited = trickle_until_answer(c, lambda i: b"X-Trickle: %d\r\n" % i,
                                      every_s=0.3, count=40, reply_timeout_s=3)
        [line] = c.reply_lines()
        assert c.closed()
    m = re.fullmatch(r"421 4\.4\.2 Timeout during DATA \(([0-9A-Z]{16})\)", line)
    assert m, line
    assert 1.8 <= waited <= 4.0, waited
    assert connection_events(gw, 1)[0]["end"] == "data-timeout"
    assert gw.maildir_messages() == []
    deliver_one(gw)
