"""Process life: graceful stop on SIGTERM, bounded memory while a large message streams in."""

from __future__ import annotations

import signal
import smtplib
import socket
import time

from tests.support.gateway import base_policy
from tests.support.smtpclient import RawSmtpClient


def _rss_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(key)


def test_sigterm_finishes_transactions_and_closes_idle_sessions(gateway_factory):
    gw = gateway_factory(base_policy(limits={"shutdown_grace_s": 10}))
    with RawSmtpClient(gw.address) as idle, RawSmtpClient(gw.address) as busy:
        assert idle.greeting.startswith("220 ")
        assert busy.greeting.startswith("220 ")
        for cmd in (b"EHLO c.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<bob@example.test>",
                    b"DATA"):
            busy.cmd(cmd)
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

        gw.signal(signal.SIGTERM)
        gw.wait_for(lambda e: e.get("event") == "stopping")
        # the idle session is told, and closed
        assert idle.reply().startswith("421 4.3.2")
        assert idle.rest() == []
        # new connections are refused once the listener is closed
        time.sleep(0.2)
        try:
            socket.create_connection(gw.address, timeout=2).close()
            refused = False
        except OSError:
            refused = True
        assert refused
        # the transaction in flight completes and is delivered
        busy.send(b"second half\r\n.\r\n")
        reply = busy.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as"), reply
        busy.send(b"QUIT\r\n")
        assert gw.proc is not None and gw.proc.wait(10) == 0
    [msg] = gw.maildir_messages()
    assert msg.endswith(b"first half\r\nsecond half\r\n")


def test_a_large_message_streams_to_disk_with_bounded_memory(gateway_factory):
    size = 40 * 1024 * 1024
    gw = gateway_factory(base_policy(limits={"max_message_bytes": 64 * 1024 * 1024},
                                     headers={"spam_headers": False}))
    assert gw.proc is not None
    base = _rss_kib(gw.proc.pid)
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    with smtplib.SMTP(*gw.address, timeout=60) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        s.rcpt("big@example.test")
        code, _ = s.data(b"Subject: big\r\n\r\n" + body)
    assert code == 250
    peak = _rss_kib(gw.proc.pid, "VmHWM")
    growth_mib = (peak - base) / 1024
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB for a 40 MiB message"
    [msg] = gw.maildir_messages()
    assert len(msg) > size and msg.endswith(line)
