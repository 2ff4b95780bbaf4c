"""STARTTLS (RFC 3207) on the real gateway: advertising, the upgrade, the trace and log records,
the command replies, and the plaintext command injection defence (CVE-2011-0411 class: commands
pipelined in plaintext behind STARTTLS must be discarded, never executed inside the TLS session).
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink
from tests.support.smtpclient import RawSmtpClient

OPENSSL = shutil.which("openssl")
SWAKS = shutil.which("swaks")
RCPT = "alice@example.test"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if OPENSSL is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=mx.gateway.test", "-days", "1",
                    "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return crt, key


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def _policy(sink: Sink, cert: tuple[Path, Path] | None, **limits: Any) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "limits": {"idle_timeout_s": 5, "command_timeout_s": 5, **limits}}
    if cert is not None:
        sections["tls"] = {"cert_file": str(cert[0]), "key_file": str(cert[1])}
    return base_policy(f"smtp://127.0.0.1:{sink.port}", **sections)


@pytest.fixture
def gw(gateway_factory, sink, cert) -> GatewayProcess:
    return gateway_factory(_policy(sink, cert))


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _greeted(gw: GatewayProcess) -> RawSmtpClient:
    c = RawSmtpClient(gw.address)
    assert c.greeting.startswith("220 ")
    return c


def _starttls(c: RawSmtpClient) -> None:
    """The handshake, after the 220; asserts nothing was buffered after the 220."""
    c.starttls(_client_context(), server_hostname="mx.gateway.test")


def _connection_event(gw: GatewayProcess, **match: Any) -> dict[str, Any]:
    return gw.wait_for(lambda e: e.get("event") == "connection"
                       and all(e.get(k) == v for k, v in match.items()))


# -- advertising and the happy path ---------------------------------------------------------------

def test_ehlo_advertises_starttls_only_before_tls(gw):
    c = _greeted(gw)
    before = c.cmd("EHLO client.test").split("\n")
    assert "250-STARTTLS" in before or "250 STARTTLS" in before, before
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    _starttls(c)
    after = c.cmd("EHLO client.test").split("\n")
    assert after[0] == "250-mx.gateway.test"
    assert not [x for x in after if "STARTTLS" in x], after
    assert "250-PIPELINING" in after  # the rest of the list is still there
    assert c.cmd("QUIT").startswith("221 2.0.0")
    c.close()


def test_no_starttls_without_a_certificate(gateway_factory, sink):
    gw = gateway_factory(_policy(sink, None))
    c = _greeted(gw)
    ehlo = c.cmd("EHLO client.test")
    assert "STARTTLS" not in ehlo
    assert c.cmd("STARTTLS") == "502 5.5.1 STARTTLS not available"
    assert c.cmd("NOOP").startswith("250 ")  # still plaintext, still serving
    c.close()


def test_full_transaction_over_tls_is_delivered(gw, sink):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        code, text = s.starttls(context=_client_context())
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert s.mail("bob@sender.test")[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        code, text = s.data(b"From: bob@sender.test\r\nTo: alice@example.test\r\n"
                            b"Subject: over tls\r\n\r\nsecret\r\n")
    assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[1]
    [msg] = sink.wait_for(1)
    assert msg.mail_from == "bob@sender.test" and msg.rcpts == (RCPT,)
    received = msg.data.replace(b"\r\n\t", b" ").split(b"\r\n", 1)[0].decode()
    assert received.startswith("Received: from client.test ([127.0.0.1]) by mx.gateway.test "
                               f"(mailgate) with ESMTPS id {qid} for <{RCPT}>; "), received
    assert msg.data.endswith(b"\r\n\r\nsecret\r\n")
    conn = _connection_event(gw, end="quit")
    assert conn["tls"] is True and conn["accepted"] == 1 and conn["helo"] == "client.test"


def test_plaintext_session_is_logged_without_tls(gw, sink):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.sendmail("bob@sender.test", [RCPT], b"Subject: plain\r\n\r\nx\r\n")
    [msg] = sink.wait_for(1)
    assert b"with ESMTP id " in msg.data.replace(b"\r\n\t", b" ")
    assert b"ESMTPS" not in msg.data
    assert _connection_event(gw, end="quit")["tls"] is False


# -- command replies --------------------------------------------------------------------------------

def test_starttls_with_an_argument_is_a_syntax_error(gw):
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS now") == "501 5.5.4 Syntax: STARTTLS"
    assert c.cmd("NOOP").startswith("250 ")  # no handshake was started
    c.close()


def test_second_starttls_inside_tls_is_refused(gw):
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS").startswith("220 ")
    _starttls(c)
    assert c.cmd("STARTTLS") == "503 5.5.1 TLS already active"
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS") == "503 5.5.1 TLS already active"
    assert c.cmd("NOOP").startswith("250 ")
    c.close()


def test_state_is_reset_by_starttls(gw, sink):
    """RFC 3207 4.2: the HELO and an open transaction from before TLS are forgotten."""
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<before@sender.test>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{RCPT}>").startswith("250 2.1.5")
    assert c.cmd("STARTTLS").startswith("220 ")
    _starttls(c)
    assert c.cmd("MAIL FROM:<after@sender.test>") == "503 5.5.1 Send HELO/EHLO first"
    assert c.cmd("EHLO client.test").startswith("250-")
    assert c.cmd(f"RCPT TO:<{RCPT}>") == "503 5.5.1 Need MAIL command"
    assert c.cmd("DATA") == "503 5.5.1 Need MAIL command"
    # a fresh transaction inside TLS works and carries only the new envelope
    assert c.cmd("MAIL FROM:<after@sender.test>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{RCPT}>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354 ")
    assert c.cmd("Subject: t\r\n\r\nx\r\n.").startswith("250 2.0.0 ")
    assert c.cmd("QUIT").startswith("221 ")
    c.close()
    [msg] = sink.wait_for(1)
    assert msg.mail_from == "after@sender.test" and msg.rcpts == (RCPT,)
    assert [c for c in sink.commands if c.startswith("MAIL")] == [
        "MAIL FROM:<before@sender.test>", "MAIL FROM:<after@sender.test>"]
    # the pre-TLS transaction is logged as aborted, the TLS one as accepted
    events = {e["sender"]: e for e in gw.events("message")}
    assert events["before@sender.test"]["action"] == "aborted"
    assert events["after@sender.test"]["action"] == "accept"


# -- plaintext command injection (CVE-2011-0411 class) ------------------------------------------------

INJECTIONS = {
    "MAIL": b"MAIL FROM:<inject@evil.test>\r\n",
    "MAIL+RCPT": b"MAIL FROM:<inject@evil.test>\r\nRCPT TO:<alice@example.test>\r\n",
    "EHLO+MAIL": b"EHLO inject.test\r\nMAIL FROM:<inject@evil.test>\r\n",
    "RSET": b"RSET\r\n",
    "NOOP+QUIT": b"NOOP\r\nQUIT\r\n",
    "STARTTLS": b"STARTTLS\r\n",
}


@pytest.mark.parametrize("injected", list(INJECTIONS.values()), ids=list(INJECTIONS))
def test_plaintext_pipelined_after_starttls_is_discarded(gw, sink, injected):
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\n" + injected)  # one plaintext write
    assert c.reply() == "220 2.0.0 Ready to start TLS"
    _starttls(c)  # also asserts no other plaintext reply arrived after the 220
    # inside TLS, pipelined: if the injected EHLO/MAIL had run, these replies would differ
    c.send(f"MAIL FROM:<real@sender.test>\r\nEHLO client.test\r\n"
           f"RCPT TO:<{RCPT}>\r\nQUIT\r\n".encode())
    replies = c.rest(reset_ok=True)
    c.close()
    assert len(replies) == 4, replies  # only the four commands sent inside TLS got replies
    assert replies[0] == "503 5.5.1 Send HELO/EHLO first"
    assert replies[1].startswith("250-mx.gateway.test\n") and "STARTTLS" not in replies[1]
    assert replies[2] == "503 5.5.1 Need MAIL command"
    assert replies[3].startswith("221 2.0.0")
    conn = _connection_event(gw, end="quit")
    assert conn["tls"] is True and conn["helo"] == "client.test"
    assert conn["transactions"] == 0
    assert not [e for e in gw.events("message") if e.get("sender") == "inject@evil.test"]
    assert not [x for x in sink.commands if "inject" in x]


def test_injection_inside_the_data_of_the_tls_session_is_not_replayed(gw, sink):
    """Bytes sent in plaintext after STARTTLS never surface later (e.g. after DATA)."""
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\nMAIL FROM:<inject@evil.test>\r\nRCPT TO:<victim@example.test>\r\n")
    assert c.reply().startswith("220 ")
    _starttls(c)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<real@sender.test>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{RCPT}>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354 ")
    assert c.cmd("Subject: t\r\n\r\nbody\r\n.").startswith("250 2.0.0 ")
    c.send(b"QUIT\r\n")
    assert [r[:3] for r in c.rest(reset_ok=True)] == ["221"]
    c.close()
    [msg] = sink.wait_for(1)
    assert msg.rcpts == (RCPT,) and msg.mail_from == "real@sender.test"
    assert not [x for x in sink.commands if "inject" in x or "victim" in x]


# -- broken handshakes ---------------------------------------------------------------------------------

def test_garbage_instead_of_client_hello_closes_only_that_connection(gw, sink):
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS").startswith("220 ")
    start = time.monotonic()
    c.send(b"MAIL FROM:<plain@evil.test>\r\nthis is not a TLS ClientHello\r\n" * 4)
    got = c.until_closed(4)  # idle_timeout_s is 5: it is the garbage that closes it
    c.close()
    assert time.monotonic() - start < 4
    assert not got.startswith((b"2", b"5", b"4")), got  # a TLS alert at most, no SMTP reply
    conn = _connection_event(gw, end="lost: TLSSetupException")
    assert conn["tls"] is False
    # the gateway still serves others
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.starttls(context=_client_context())
        s.sendmail("bob@sender.test", [RCPT], b"Subject: after garbage\r\n\r\nok\r\n")
    [msg] = sink.wait_for(1)
    assert msg.mail_from == "bob@sender.test"
    assert not [x for x in sink.commands if "evil" in x]


def test_silent_client_after_starttls_times_out(gateway_factory, sink, cert):
    gw = gateway_factory(_policy(sink, cert, idle_timeout_s=1))
    c = _greeted(gw)
    c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS").startswith("220 ")
    start = time.monotonic()
    assert c.until_closed(4) == b""  # never a plaintext reply
    c.close()
    assert 0.8 < time.monotonic() - start < 4
    assert _connection_event(gw)["tls"] is False
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        assert s.noop()[0] == 250


# -- swaks ---------------------------------------------------------------------------------------------

@pytest.mark.swaks
@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
def test_swaks_tls(gw, sink):
    assert SWAKS is not None
    res = subprocess.run(
        [SWAKS, "--tls", "--server", f"{gw.host}:{gw.port}", "--helo", "swaks.client.test",
         "--from", "swaks@sender.test", "--to", RCPT, "--header", "Subject: swaks tls",
         "--body", "via swaks over TLS", "--timeout", "10"],
        capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "<-  220 2.0.0 Ready to start TLS" in res.stdout
    assert "=== TLS started with cipher" in res.stdout
    [msg] = sink.wait_for(1)
    assert msg.mail_from == "swaks@sender.test" and msg.rcpts == (RCPT,)
    assert b"with ESMTPS id " in msg.data.replace(b"\r\n\t", b" ")
    assert b"via swaks over TLS" in msg.data
    conn = _connection_event(gw, helo="swaks.client.test")
    assert conn["tls"] is True and conn["accepted"] == 1
