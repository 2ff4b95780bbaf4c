"""The review fixes of a1da6d2, each pinned by a test on the real gateway process: transport splits
follow the downstream transaction already opened, a downstream 421 never reaches the client as a
421, HELO names and SIZE values are validated, the refused-recipient cap, forged X-Spam-* headers
removed, local write failures (Maildir, quarantine) answer 451 4.3.0, the SIGTERM grace period,
the relay connect timeout, max_session_s, and ``mailgate run`` on the shipped default policy.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import REPO, base_policy
from tests.support.sink import Sink
from tests.support.smtpclient import RawSmtpClient

QID = r"[0-9A-HJKMNP-TV-Z]{16}"
SID = r"S[0-9A-HJKMNP-TV-Z]{15}"
SENDER = "bob@sender.test"


def message(rcpt: str = "alice@example.test", *, extra: bytes = b"", subject: str = "hi"
            ) -> bytes:
    """A complete, well-formed message (no header symbols), without the final ".CRLF"."""
    return (f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            "Date: Mon, 02 Jan 2006 15:04:05 +0000\r\n"
            "Message-ID: <hardening@sender.test>\r\n").encode() + extra + b"\r\nhello\r\n"


def ehlo(c: RawSmtpClient, name: str = "client.test") -> None:
    reply = c.cmd(f"EHLO {name}")
    assert reply.startswith("250-mx.gateway.test\n"), reply


def send_data(c: RawSmtpClient, data: bytes) -> str:
    """DATA, the message, the final dot; returns the end-of-data reply."""
    assert c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    return c.cmd(data + b".")


def qid_of(reply: str) -> str:
    m = re.search(rf"\(({QID})\)$", reply)
    assert m, f"no (qid) at the end of {reply!r}"
    return m[1]


def queued(reply: str) -> str:
    m = re.fullmatch(rf"250 2\.0\.0 Ok: queued as ({QID})", reply)
    assert m, reply
    return m[1]


def header_block(msg: bytes) -> list[bytes]:
    """The raw header lines (as on disk, still folded, CRLF removed) of a message."""
    head = msg.split(b"\r\n\r\n", 1)[0]
    return head.split(b"\r\n")


def headers(msg: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) of every header field."""
    out: list[tuple[str, str]] = []
    for line in header_block(msg):
        if line[:1] in (b" ", b"\t"):
            name, value = out[-1]
            out[-1] = (name, value + " " + line.decode().strip())
        else:
            name, _, value = line.decode().partition(":")
            out.append((name, value.strip()))
    return out


# -- 1. transport split ---------------------------------------------------------------------------

def test_transport_split_follows_the_downstream_transaction_already_opened(gateway_factory):
    with Sink(replies={"RCPT:nobody@a.test": "550 5.1.1 no such user here"}) as sink_a, \
            Sink() as sink_b, Sink() as default:
        gw = gateway_factory(base_policy(
            downstream=f"smtp://127.0.0.1:{default.port}",
            domains={"accepted": ["example.test", "a.test", "b.test"]},
            relay={"transport": {"a.test": f"smtp://127.0.0.1:{sink_a.port}",
                                 "b.test": f"smtp://127.0.0.1:{sink_b.port}"}}))
        with RawSmtpClient(gw.address) as c:
            ehlo(c)
            assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
            # Refused by sink A: no recipient accepted, but the downstream transaction to A is
            # open, so b.test (another destination) must not join it.
            refused = c.cmd("RCPT TO:<nobody@a.test>")
            qid = qid_of(refused)
            assert refused == f"550 5.1.1 no such user here ({qid})"
            assert c.cmd("RCPT TO:<bob@b.test>") == (
                "452 4.5.3 Recipient needs a separate transaction (different destination), "
                f"send it again ({qid})")
            assert c.cmd("RSET") == "250 2.0.0 Ok"
            # Sent again in a transaction of its own: it goes to sink B.
            assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
            assert c.cmd("RCPT TO:<bob@b.test>") == "250 2.1.5 Recipient ok"
            qid2 = queued(send_data(c, message("bob@b.test")))
            assert c.cmd("QUIT") == "221 2.0.0 Bye"
        [msg] = sink_b.wait_for(1)
        assert (msg.mail_from, msg.rcpts) == (SENDER, ("bob@b.test",))
        assert f"id {qid2}".encode() in msg.data
        assert sink_a.messages == []
        assert [x for x in sink_a.commands if x.upper().startswith("RCPT")] == \
            ["RCPT TO:<nobody@a.test>"]
        assert default.connections == 0
    first = gw.message_event(qid)
    assert first["rcpts"] == [] and first["rcpt_refused"] == 2


# -- 2. a downstream 421 ---------------------------------------------------------------------------

@pytest.mark.parametrize("where,replies", [
    ("MAIL", {"MAIL": "421 4.3.2 shutting down"}),
    ("RCPT", {"RCPT:x@example.test": "421 4.3.2 shutting down"}),
    ("DATA_END", {"DATA_END": "421 4.3.2 shutting down"}),
])
def test_downstream_421_becomes_451_and_the_session_goes_on(gateway_factory, where, replies):
    with Sink(replies=replies) as closing, Sink() as good:
        gw = gateway_factory(base_policy(
            downstream=f"smtp://127.0.0.1:{closing.port}",
            domains={"accepted": ["example.test", "ok.test"]},
            relay={"transport": {"ok.test": f"smtp://127.0.0.1:{good.port}"}}))
        lost = "451 4.4.2 Downstream connection lost, try again later"
        with RawSmtpClient(gw.address) as c:
            ehlo(c)
            assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
            reply = c.cmd("RCPT TO:<x@example.test>")
            if where == "DATA_END":
                assert reply == "250 2.1.5 Recipient ok"
                reply = send_data(c, message("x@example.test"))
            qid = qid_of(reply)
            assert reply == f"{lost} ({qid})"
            assert c.cmd("NOOP") == "250 2.0.0 Ok"
            assert c.cmd("RSET") == "250 2.0.0 Ok"
            # The session is still usable: a later transaction to a working downstream.
            assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
            assert c.cmd("RCPT TO:<bob@ok.test>") == "250 2.1.5 Recipient ok"
            qid2 = queued(send_data(c, message("bob@ok.test")))
            assert c.cmd("QUIT") == "221 2.0.0 Bye"
            assert not re.search(rb"(?:^|\r\n)421", bytes(c.received)), c.received
        [msg] = good.wait_for(1)
        assert msg.rcpts == ("bob@ok.test",) and f"id {qid2}".encode() in msg.data
        if where == "DATA_END":  # the sink took the data, then said 421
            [refused] = closing.messages
            assert refused.replies == ("421 4.3.2 shutting down",)
        else:
            assert closing.messages == []
    ev = gw.message_event(qid)
    assert ev["reply"] == f"{lost} ({qid})"
    # At RCPT the transaction was refused; after DATA the policy's decision stands (accept)
    # and the relay result says why the client got a 451.
    assert ev["action"] == ("accept" if where == "DATA_END" else "tempfail")
    assert gw.message_event(qid2)["reply"] == f"250 2.0.0 Ok: queued as {qid2}"


# -- 3. HELO names and SIZE values -------------------------------------------------------------

def test_bad_helo_names_and_size_values_get_501_and_the_session_goes_on(gateway_factory):
    gw = gateway_factory(base_policy(limits={"max_invalid_commands": 20}))
    longest = ".".join(["h" * 63] * 4)  # 255 bytes: the longest name accepted
    assert len(longest) == 255
    with RawSmtpClient(gw.address) as c:
        for verb, name in [(b"EHLO", b"h\xc3\xa9llo.test"), (b"HELO", b"h\xc3\xa9llo.test"),
                           (b"EHLO", b"h\xffllo.test"), (b"EHLO", b"a" * 256),
                           (b"HELO", b"a" * 300)]:
            assert c.cmd(verb + b" " + name) == f"501 5.5.4 Syntax: {verb.decode()} hostname"
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "503 5.5.1 Send HELO/EHLO first"
        ehlo(c, longest)
        for size in ("²", "١٢٣"):  # str.isdigit() is True for both; int() takes the second
            # Without SMTPUTF8 the parameter parser refuses any non-ASCII value; with it, the
            # value reaches the SIZE check, which takes ASCII digits only.
            assert c.cmd(f"MAIL FROM:<a@b.test> SIZE={size}") == "501 5.5.4 Bad parameter syntax"
            assert c.cmd(f"MAIL FROM:<a@b.test> SMTPUTF8 SIZE={size}") == \
                "501 5.5.4 Bad SIZE parameter"
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
        assert c.cmd("MAIL FROM:<a@b.test> SIZE=300") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        qid = queued(send_data(c, message()))
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    [msg] = gw.maildir_messages()
    assert all(len(line) <= 998 for line in header_block(msg))
    received = [v for n, v in headers(msg) if n == "Received"]
    assert len(received) == 1
    assert re.fullmatch(rf"from {longest} \(\[127\.0\.0\.1\]\) by mx\.gateway\.test \(mailgate\) "
                        rf"with ESMTP id {qid} for <alice@example.test>; .+ GMT", received[0]), \
        received[0]
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["helo"] == longest and conn["end"] == "quit" and conn["invalid"] == 10
    log = "\n".join(gw.lines())
    assert "Traceback" not in log and "internal error" not in log


# -- 4. refused-recipient cap ------------------------------------------------------------------

def test_refused_recipients_cap_closes_but_splits_do_not_count(gateway_factory):
    gw = gateway_factory(base_policy(
        domains={"accepted": ["example.test", "other.test"]},
        limits={"max_refused_recipients": 3},
        filters=[{"name": "rcpt", "recipients": ["alice@example.test", "@other.test"]},
                 {"name": "headers", "on_error": "continue"}],
        classes={"other": {"domains": ["other.test"]}}))
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        split = c.cmd("RCPT TO:<x@other.test>")
        qid = qid_of(split)
        split_reply = ("452 4.5.3 Recipient needs a separate transaction (different policy), "
                       f"send it again ({qid})")
        assert split == split_reply
        for _ in range(3):  # four splits in all
            assert c.cmd("RCPT TO:<x@other.test>") == split_reply
        assert c.cmd("RCPT TO:<someone@elsewhere.test>") == \
            f"550 5.7.1 Relay access denied ({qid})"
        assert c.cmd("RCPT TO:<unknown@example.test>") == (
            "550 5.1.1 <unknown@example.test>: Recipient address rejected: User unknown "
            f"({qid})")
        for _ in range(2):  # more splits after two refusals: still open
            assert c.cmd("RCPT TO:<y@other.test>") == split_reply
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
        assert c.cmd("RCPT TO:<again@elsewhere.test>") == \
            f"550 5.7.1 Relay access denied ({qid})"
        closing = c.reply()
        m = re.fullmatch(rf"421 4\.7\.0 Too many refused recipients, closing connection "
                         rf"\(({SID})\)", closing)
        assert m, closing
        assert c.closed()
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["sid"] == m[1] and conn["end"] == "too-many-refused-rcpts"
    assert gw.maildir_messages() == []


# -- 5. forged spam headers --------------------------------------------------------------------

FORGED = b"X-Spam-Status: No, score=-100\r\nX-Spam-Flag: NO\r\nx-spam-report: all clean\r\n"


@pytest.mark.parametrize("spam_headers", [True, False])
def test_forged_spam_headers(gateway_factory, spam_headers):
    gw = gateway_factory(base_policy(headers={"spam_headers": spam_headers}))
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        queued(send_data(c, message(extra=FORGED)))
    [msg] = gw.maildir_messages()
    spam = [(n, v) for n, v in headers(msg) if n.lower().startswith("x-spam-")]
    assert msg.endswith(b"\r\n\r\nhello\r\n")
    if spam_headers:
        assert b"score=-100" not in msg and b"X-Spam-Flag" not in msg
        assert b"all clean" not in msg
        assert spam[:2] == [("X-Spam-Status", "No, score=0 required=5 action=accept"),
                            ("X-Spam-Score", "0")]
        assert [n for n, _ in spam[2:]] in ([], ["X-Spam-Symbols"])  # ours: all three
        assert msg.count(b"X-Spam-Status:") == 1
    else:
        assert FORGED in msg  # byte for byte, in place
        assert spam == [("X-Spam-Status", "No, score=-100"), ("X-Spam-Flag", "NO"),
                        ("x-spam-report", "all clean")]


# -- 6./7. local write failures ------------------------------------------------------------------

@pytest.mark.parametrize("broken", ["Maildir", "Maildir/new"])
def test_maildir_write_failure_answers_451(gateway_factory, broken):
    gw = gateway_factory(base_policy())  # a Maildir it cannot write is refused at start:
    target = gw.workdir / broken  # it breaks while the gateway runs
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"a regular file where a directory should be\n")  # root or not
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        reply = send_data(c, message())
        qid = qid_of(reply)
        assert reply == f"451 4.3.0 Local delivery failed, try again later ({qid})"
        assert c.cmd("NOOP") == "250 2.0.0 Ok"
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert b"250 2.0.0 Ok: queued" not in bytes(c.received)
    ev = gw.message_event(qid)
    assert ev["relay"].startswith("maildir failed:") and ev["reply"] == reply
    assert target.read_bytes() == b"a regular file where a directory should be\n"
    tmp = gw.workdir / "Maildir" / "tmp"
    assert not tmp.is_dir() or list(tmp.iterdir()) == []


def test_quarantine_write_failure_answers_451(gateway_factory):
    gw = gateway_factory(base_policy(spool={"directory": "spool"},
                                     actions={"quarantine": 0.0}), start=False)
    (gw.workdir / "spool" / "quarantine.db").mkdir(parents=True)  # the index cannot be opened
    gw.start()
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        reply = send_data(c, message())
        qid = qid_of(reply)
        assert reply == f"451 4.3.0 Temporary local problem, try again later ({qid})"
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    ev = gw.message_event(qid)
    assert ev["action"] == "quarantine" and ev["relay"].startswith("quarantine failed:")
    assert gw.maildir_messages() == []  # a quarantined message is never relayed


# -- 8. SIGTERM with a transaction stalled in DATA -----------------------------------------------

def test_sigterm_closes_a_stalled_data_transfer_after_the_grace_period(gateway_factory):
    gw = gateway_factory(base_policy(limits={"shutdown_grace_s": 1.0}))
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Recipient ok"
        assert c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        c.send(message()[:60])  # and then nothing: stalled mid-DATA
        time.sleep(0.3)
        start = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.proc is not None
        code = gw.proc.wait(5)
        elapsed = time.monotonic() - start
        got = c.until_closed(3)
    assert code == 0
    assert 0.9 <= elapsed < 3, f"exited {elapsed:.2f}s after SIGTERM, grace 1s"
    assert got == b"" or got.startswith(b"421 4.3.2 "), got  # never a 250
    assert [e["event"] for e in gw.events() if e.get("event") in ("stopping", "stopped")] == \
        ["stopping", "stopped"]
    assert gw.maildir_messages() == []
    assert list((gw.workdir / "spool" / "incoming").iterdir()) == []


# -- 9. relay connect timeout ----------------------------------------------------------------------

def test_relay_connect_timeout_when_the_downstream_never_greets(gateway_factory):
    with socket.socket() as mute:  # the kernel completes the handshake; nobody ever speaks
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        port = mute.getsockname()[1]
        gw = gateway_factory(base_policy(downstream=f"smtp://127.0.0.1:{port}",
                                         relay={"connect_timeout_s": 1.0}))
        with RawSmtpClient(gw.address) as c:
            ehlo(c)
            assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
            start = time.monotonic()
            reply = c.cmd("RCPT TO:<alice@example.test>")
            elapsed = time.monotonic() - start
            qid = qid_of(reply)
            assert reply == f"451 4.4.1 Downstream server unavailable, try again later ({qid})"
            assert 0.9 <= elapsed < 3, f"RCPT answered after {elapsed:.2f}s, timeout 1s"
            assert c.cmd("NOOP") == "250 2.0.0 Ok"
            assert c.cmd("QUIT") == "221 2.0.0 Bye"
    ev = gw.message_event(qid)
    assert ev["relay"].startswith("connect failed:") and ev["reply"] == reply


# -- 10. max_session_s -------------------------------------------------------------------------

def test_max_session_closes_an_active_slow_session(gateway_factory):
    gw = gateway_factory(base_policy(limits={"max_session_s": 1.0}))
    start = time.monotonic()
    with RawSmtpClient(gw.address) as c:
        ehlo(c)
        oks = 0
        while True:
            reply = c.cmd("NOOP")
            if not reply.startswith("250"):
                break
            assert reply == "250 2.0.0 Ok"
            oks += 1
            assert time.monotonic() - start < 5, "session not closed after 5 s"
            time.sleep(0.3)
        elapsed = time.monotonic() - start
        m = re.fullmatch(rf"421 4\.4\.2 Session too long, closing connection \(({SID})\)", reply)
        assert m, reply
        assert c.closed()
    assert oks >= 2
    assert 0.9 <= elapsed < 2.5, f"closed after {elapsed:.2f}s, max_session_s = 1"
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["sid"] == m[1] and conn["end"] == "max-session"


# -- 11. `mailgate run` on the shipped default policy ----------------------------------------------

def test_mailgate_run_without_arguments_uses_the_shipped_default_policy(gateway_factory):
    text = (REPO / "policies" / "default.toml").read_text()
    assert text.count('"127.0.0.1:2525"') == 1 and text.count("nameservers = []") == 1
    mailgate = Path(sys.executable).parent / "mailgate"
    assert mailgate.is_file(), f"no console script next to {sys.executable}"
    # the port, and DNS from a loopback server (tests never ask the host's resolver)
    zone = 'sender.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    with DnsServer(zone) as ns:
        text = text.replace('"127.0.0.1:2525"', '"127.0.0.1:0"').replace(
            "nameservers = []", f'nameservers = ["127.0.0.1:{ns.port}"]')
        # the file alone: the rule set it names is shipped in the package
        gw = gateway_factory(text, name="policies/default.toml", start=False,
                             argv=[str(mailgate), "run", "--log-format", "json"],
                             env={"PYTHONPATH": "", "MAILGATE_POLICY": "",
                                  "MAILGATE_SYSTEM_POLICY": str(REPO / "no-such.toml")})
        # (PYTHONPATH "": the installed package, not the checkout)
        gw.start()
        _run_default_policy(gw)
        assert ("_dmarc.sender.test", "TXT", "udp") in ns.queries


def _run_default_policy(gw):
    listening = gw.events("listening")[0]
    assert listening["policy"] == "policies/default.toml"
    assert listening["filters"] == ["rcpt", "headers", "spf", "dkim", "arc", "dmarc",
                                    "authres", "mime", "rules", "bayes", "attachments"]
    out = subprocess.run(
        ["swaks", "--server", gw.host, "--port", str(gw.port), "--from", SENDER,
         "--to", "alice@example.test", "--helo", "client.test", "--timeout", "10",
         "--header", "Subject: default path", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(rf"^<-  250 2\.0\.0 Ok: queued as ({QID})$", out.stdout, re.M)
    assert m, out.stdout
    qid = m[1]
    # the shipped default is queue mode: the 250 came after the commit, delivery follows
    done = gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid)
    assert done["outcome"] == "done"
    [msg] = gw.maildir_messages()  # the default: in the directory mailgate runs in
    assert msg.startswith(f"Return-Path: <{SENDER}>\r\nDelivered-To: alice@example.test\r\n"
                          .encode())
    [received] = [v for n, v in headers(msg) if n == "Received"]
    assert re.fullmatch(rf"from client\.test \(\[127\.0\.0\.1\]\) by mailgate\.example\.test "
                        rf"\(mailgate\) with ESMTP id {qid} for <alice@example.test>; .+",
                        received), received
    assert b"hello from swaks" in msg
    ev = gw.message_event(qid)
    assert ev["action"] == "accept"
    assert {"SPF_PASS(0)[ip4:127.0.0.1]", "DKIM_NONE(0)", "ARC_NONE(0)",
            "DMARC_NONE(0)[no DMARC record]", "BAYES_UNTRAINED(0)[spam=0 ham=0]"} \
        <= set(ev["symbols"]), ev["symbols"]
    [ar] = [v for n, v in headers(msg) if n == "Authentication-Results"]
    assert re.fullmatch(r"mailgate\.example\.test;\s+spf=pass smtp\.mailfrom=bob@sender\.test;"
                        r"\s+dkim=none;\s+dmarc=none header\.from=sender\.test;\s+arc=none", ar), ar
