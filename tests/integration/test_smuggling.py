"""SMTP smuggling (SEC Consult, December 2023; CVE-2023-51764/51765/51766 class).

A client ends its message with a malformed end-of-data that some receivers accept (``<LF>.<LF>``,
``<CR><LF>.<CR>``, ``<CR>.<CR>``, ...) and follows it, inside the same DATA, with a second
complete transaction (``MAIL FROM:<spoof@evil.test>`` ... ``<CR><LF>.<CR><LF>``). A gateway that
ends DATA only at ``<CR><LF>.<CR><LF>`` sees one message; a gateway that relays the malformed
sequence as-is lets a vulnerable downstream see two. mailgate must do neither harm: with
``limits.bare_lf = "reject"`` the message is refused (550 5.6.0) whenever it holds a bare CR or
LF; with ``"normalize"`` it is relayed with every bare CR/LF turned into CRLF and every line that
starts with "." dot-stuffed, so the spoofed commands reach the downstream only as body text.

Payload (one write after the 354): headers, a body line, the malformed end-of-data, then the
smuggled transaction whose own ``<CR><LF>.<CR><LF>`` is the one real end of data, then QUIT -- the
classic form of the attack. The gateway must therefore answer exactly one end-of-data reply and
then the 221: never a reply to the smuggled MAIL/RCPT/DATA.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.postfix import PostfixInstance, postfix_available, postfix_unavailable_reason
from tests.support.sink import Sink
from tests.support.smtpclient import RawSmtpClient

SENDER = "sender@origin.test"
RCPT = "alice@example.test"
SPOOF = (b"MAIL FROM:<spoof@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
         b"From: spoof\r\n\r\nsmuggled")
TERM = b"\r\n.\r\n"

# (id, malformed end-of-data). Sources: SEC Consult "SMTP Smuggling" (2023) and the Postfix,
# Sendmail, Exim and Cisco advisories that followed it.
VARIANTS = [
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("CRLF.CR", b"\r\n.\r"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("LF.CR", b"\n.\r"),
    ("CR.LF", b"\r.\n"),
    ("CRLF.LFCRLF", b"\r\n.\n\r\n"),
    ("CRLF-CR.CRLF", b"\r\n\r.\r\n"),
    ("LFLF.LFLF", b"\n\n.\n\n"),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n"),
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n"),
    ("CRLF.SP-CRLF", b"\r\n. \r\n"),
    ("CRLF.TAB-CRLF", b"\r\n.\t\r\n"),
]


def _bare(data: bytes) -> bool:
    """Whether ``data`` holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def _body(token: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: smuggle {token}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{token}@origin.test>\r\n"
            f"\r\n..leading dot {token}\r\nhello").encode()


def _open_transaction(gw: GatewayProcess) -> RawSmtpClient:
    c = RawSmtpClient(gw.address)
    assert c.greeting.startswith("220 ")
    assert c.cmd("EHLO client.origin.test").startswith("250-")
    assert c.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0")
    assert c.cmd(f"RCPT TO:<{RCPT}>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354 ")
    return c


def _smuggle(gw: GatewayProcess, variant: bytes, token: str) -> list[str]:
    """The whole attack in one write after the 354; returns every reply that followed."""
    c = _open_transaction(gw)
    try:
        c.send(_body(token) + variant + SPOOF + TERM + b"QUIT\r\n")
        return c.rest(reset_ok=True)
    finally:
        c.close()


def _wait(pred: Callable[[], bool], timeout_s: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _session_events(gw: GatewayProcess) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The (only) client session's connection event and its message events."""
    conn = gw.wait_for(lambda e: e.get("event") == "connection" and e.get("end") == "quit")
    msgs = [e for e in gw.events("message") if e.get("sid") == conn["sid"]]
    return conn, msgs


def _assert_reject_reply(replies: list[str]) -> None:
    assert len(replies) == 2, replies  # one end-of-data reply, then the 221: nothing smuggled
    assert replies[0].startswith("550 5.6.0 "), replies
    assert "bare CR or LF" in replies[0]
    assert replies[1].startswith("221 2.0.0"), replies


def _assert_accept_reply(replies: list[str]) -> str:
    assert len(replies) == 2, replies
    assert replies[0].startswith("250 2.0.0 Ok: queued as "), replies
    assert replies[1].startswith("221 2.0.0"), replies
    return replies[0].rsplit(" ", 1)[1]


def _assert_crlf_clean_and_stuffed(raw: bytes) -> None:
    crlf = raw.count(b"\r\n")
    assert raw.count(b"\r") == crlf and raw.count(b"\n") == crlf, raw
    for line in raw.split(b"\r\n"):
        if line.startswith(b"."):
            assert line.startswith(b".."), (line, raw)


def _assert_spoof_only_in_body(data: bytes) -> None:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep
    assert b"spoof" not in head and b"evil.test" not in head, head
    assert b"MAIL FROM:<spoof@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n" in body
    assert body.endswith(b"From: spoof\r\n\r\nsmuggled\r\n"), body[-80:]


# -- against the in-process sink -----------------------------------------------------------------

@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


# The downstream connection is kept for reuse only briefly, so that its QUIT (Postfix: its
# "disconnect" line) soon marks the end of everything the downstream was sent.
RELAY = {"connection_reuse_s": 0.3}


def _gateway(gateway_factory: Any, sink: Sink, bare_lf: str) -> GatewayProcess:
    policy = base_policy(f"smtp://127.0.0.1:{sink.port}", relay=RELAY,
                         limits={"idle_timeout_s": 5, "command_timeout_s": 5, "bare_lf": bare_lf})
    return gateway_factory(policy)


@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_reject_mode_refuses_or_relays_one_message(gateway_factory, sink, variant):
    gw = _gateway(gateway_factory, sink, "reject")
    token = uuid.uuid4().hex
    replies = _smuggle(gw, variant, token)
    conn, msgs = _session_events(gw)
    assert conn["transactions"] == 1
    assert len(msgs) == 1, msgs  # one transaction, not two
    [ev] = msgs
    assert ev["sender"] == SENDER and ev["rcpts"] == [RCPT]
    # the downstream session ends (QUIT) whatever happened: then nothing more can arrive
    _wait(lambda: "QUIT" in sink.commands, what="the downstream QUIT")
    assert not [c for c in sink.commands if "spoof" in c or "victim" in c], sink.commands
    assert [c for c in sink.commands if c.startswith("MAIL")] == [f"MAIL FROM:<{SENDER}>"]
    if _bare(_body(token) + variant + SPOOF):
        _assert_reject_reply(replies)
        assert ev["action"] == "refused" and ev["reply"].startswith("550 5.6.0 ")
        assert conn["accepted"] == 0 and conn["refused"] == 1
        assert sink.messages == []
        assert "DATA" not in sink.commands
    else:  # NUL, SP, TAB after the dot: no bare CR/LF, an ordinary (odd) message
        qid = _assert_accept_reply(replies)
        assert ev["qid"] == qid and ev["action"] == "accept"
        [msg] = sink.messages
        assert msg.mail_from == SENDER and msg.rcpts == (RCPT,)
        _assert_crlf_clean_and_stuffed(msg.raw)
        assert b"\r\n..leading dot " in msg.raw
        # the client did not stuff ".<NUL>" / ". ": its leading dot is stuffing (RFC 5321
        # 4.5.2) and is removed; "<NUL>." goes through as sent
        assert b"hello" + variant.replace(b"\r\n.", b"\r\n") + b"MAIL FROM:" in msg.raw
        _assert_spoof_only_in_body(msg.data)


@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_normalize_mode_relays_one_crlf_clean_message(gateway_factory, sink, variant):
    gw = _gateway(gateway_factory, sink, "normalize")
    token = uuid.uuid4().hex
    replies = _smuggle(gw, variant, token)
    qid = _assert_accept_reply(replies)
    conn, msgs = _session_events(gw)
    assert conn["transactions"] == 1 and conn["accepted"] == 1
    [ev] = msgs
    assert ev["qid"] == qid and ev["action"] == "accept" and ev["sender"] == SENDER
    _wait(lambda: "QUIT" in sink.commands, what="the downstream QUIT")
    [msg] = sink.messages
    assert msg.mail_from == SENDER and msg.rcpts == (RCPT,)
    assert [c for c in sink.commands if c.startswith(("MAIL", "RCPT"))] == [
        f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>"]
    assert sink.commands.count("DATA") == 1
    _assert_crlf_clean_and_stuffed(msg.raw)
    assert b"\r\n..leading dot " in msg.raw and b"\r\n.leading dot " in msg.data
    _assert_spoof_only_in_body(msg.data)
    assert f"id {qid}".encode() in msg.data  # our Received: header, i.e. our one message
    # "hello" and the smuggled MAIL line are separate lines now, whatever the break was
    assert b"hello\r\n" in msg.data


def test_normalize_mode_dot_after_bare_lf_is_unstuffed_and_restuffed(gateway_factory, sink):
    """A line after a bare LF is a line: "..x" loses one dot (like after CRLF) and is stuffed
    again on the way out; a lone "." there is an empty line, never the end of data."""
    gw = _gateway(gateway_factory, sink, "normalize")
    c = _open_transaction(gw)
    c.send(b"Subject: dots\r\n\r\nA\n..B\n.\nC\r.\rD" + TERM)
    reply = c.reply()
    assert reply.startswith("250 2.0.0 "), reply
    assert c.cmd("QUIT").startswith("221 ")
    c.close()
    [msg] = sink.wait_for(1)
    assert msg.data.endswith(b"\r\n\r\nA\r\n.B\r\n\r\nC\r\n\r\nD\r\n"), msg.data[-40:]
    assert msg.raw.endswith(b"\r\n\r\nA\r\n..B\r\n\r\nC\r\n\r\nD\r\n"), msg.raw[-40:]


def test_reject_mode_session_goes_on_after_the_refusal(gateway_factory, sink):
    """After 550 5.6.0 the session is clean: the next transaction on it is delivered alone."""
    gw = _gateway(gateway_factory, sink, "reject")
    c = _open_transaction(gw)
    c.send(b"Subject: one\r\n\r\nx\n.\n" + SPOOF + TERM)
    assert c.reply().startswith("550 5.6.0 ")
    assert c.cmd("RCPT TO:<alice@example.test>").startswith("503 5.5.1")  # no open transaction
    assert c.cmd("MAIL FROM:<second@origin.test>").startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<alice@example.test>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354 ")
    c.send(b"Subject: two\r\n\r\nclean\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 ")
    assert c.cmd("QUIT").startswith("221 ")
    c.close()
    [msg] = sink.wait_for(1)
    assert msg.mail_from == "second@origin.test"
    assert b"spoof" not in msg.data and msg.data.endswith(b"\r\n\r\nclean\r\n")


def test_commands_pipelined_after_the_real_terminator_are_executed(gateway_factory, sink):
    gw = _gateway(gateway_factory, sink, "reject")
    c = _open_transaction(gw)
    c.send(b"Subject: pipe\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n")
    first = c.reply()
    assert first.startswith("250 2.0.0 Ok: queued as "), first
    assert c.reply().startswith("250 2.0.0")  # RSET
    assert c.reply().startswith("250 2.0.0")  # NOOP
    # a whole second transaction pipelined behind the end of data (PIPELINING: DATA last)
    c.send(b"MAIL FROM:<two@origin.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert c.reply().startswith("250 2.1.0")
    assert c.reply().startswith("250 2.1.5")
    assert c.reply().startswith("354 ")
    c.send(b"Subject: pipe 2\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
    second = c.reply()
    assert second.startswith("250 2.0.0 Ok: queued as "), second
    [bye] = c.rest(reset_ok=True)
    assert bye.startswith("221 2.0.0")
    c.close()
    msgs = sink.wait_for(2)
    assert [m.mail_from for m in msgs] == [SENDER, "two@origin.test"]
    assert msgs[0].data.endswith(b"\r\n\r\nbody\r\n") and b"RSET" not in msgs[0].data
    assert msgs[1].data.endswith(b"\r\n\r\nsecond\r\n") and b"QUIT" not in msgs[1].data


def test_terminator_split_across_writes_still_ends_data(gateway_factory, sink):
    """Timing must not matter: CRLF.CRLF split over writes ends DATA; a bare LF split so does
    not make a terminator."""
    gw = _gateway(gateway_factory, sink, "reject")
    c = _open_transaction(gw)
    for piece in (b"Subject: split\r\n\r\nbody\r", b"\n", b".", b"\r", b"\n"):
        c.send(piece)
        time.sleep(0.05)
    assert c.reply().startswith("250 2.0.0 ")
    assert c.cmd("QUIT").startswith("221 ")
    c.close()
    [msg] = sink.wait_for(1)
    assert msg.data.endswith(b"\r\n\r\nbody\r\n")


# -- against a real Postfix downstream -------------------------------------------------------------

postfix_only = pytest.mark.skipif(
    not postfix_available(),
    reason=f"private Postfix instance unavailable: {postfix_unavailable_reason()}")


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    # A strict witness: Postfix itself refuses any bare LF the gateway would pass on
    # (smtpd_forbid_bare_newline; loopback is in the default exclusions, so clear them).
    options = {"smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": ""}
    with PostfixInstance(tmp_path_factory.mktemp("pf-smuggling"), smtpd_options=options) as pf:
        yield pf


def _module_gateway(tmp_path_factory: pytest.TempPathFactory, pf: PostfixInstance,
                    bare_lf: str) -> Iterator[GatewayProcess]:
    policy = base_policy(f"smtp://127.0.0.1:{pf.port}", relay=RELAY,
                         limits={"idle_timeout_s": 5, "command_timeout_s": 5, "bare_lf": bare_lf})
    gw = GatewayProcess(Path(tmp_path_factory.mktemp(f"gw-pf-{bare_lf}")), policy)
    with gw:
        yield gw


@pytest.fixture(scope="module")
def gw_pf_reject(tmp_path_factory, postfix) -> Iterator[GatewayProcess]:
    yield from _module_gateway(tmp_path_factory, postfix, "reject")


@pytest.fixture(scope="module")
def gw_pf_normalize(tmp_path_factory, postfix) -> Iterator[GatewayProcess]:
    yield from _module_gateway(tmp_path_factory, postfix, "normalize")


def _postfix_session(pf: PostfixInstance, since: int) -> str:
    """The smtpd "disconnect" summary of the gateway's downstream session started after line
    ``since`` of the maillog (e.g. "ehlo=1 mail=1 rcpt=1 rset=1 quit=1 commands=5")."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in pf.log_lines()[since:]:
            if "smtpd[" in line and "disconnect from" in line:
                return line
        time.sleep(0.05)
    raise AssertionError("no smtpd disconnect line:\n" + "\n".join(pf.log_lines()[since:]))


def _no_spoof_at_postfix(pf: PostfixInstance) -> None:
    for raw in pf.messages():
        head = raw.partition(b"\n\n")[0]
        assert b"spoof@evil.test" not in head and b"victim@example.test" not in head, head
    assert not [ln for ln in pf.log_lines() if "spoof@evil.test" in ln or "victim@" in ln]


@postfix_only
@pytest.mark.postfix
@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_postfix_downstream_reject_mode_gets_no_spoofed_message(postfix, gw_pf_reject, variant):
    token = uuid.uuid4().hex
    since = len(postfix.log_lines())
    replies = _smuggle(gw_pf_reject, variant, token)
    summary = _postfix_session(postfix, since)
    if _bare(_body(token) + variant + SPOOF):
        _assert_reject_reply(replies)
        assert " mail=1 rcpt=1 " in summary and "data=" not in summary, summary
        assert not [m for m in postfix.messages() if token.encode() in m]
    else:
        _assert_accept_reply(replies)
        assert " mail=1 rcpt=1 data=1 " in summary, summary
        [raw] = postfix.wait_for_messages(1, containing=token.encode())
        assert raw.startswith(f"Return-Path: <{SENDER}>\n".encode())
        assert b"\nMAIL FROM:<spoof@evil.test>\n" in raw  # body text, not a transaction
    _no_spoof_at_postfix(postfix)


@postfix_only
@pytest.mark.postfix
@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_postfix_downstream_normalize_mode_gets_one_message(postfix, gw_pf_normalize, variant):
    token = uuid.uuid4().hex
    since = len(postfix.log_lines())
    replies = _smuggle(gw_pf_normalize, variant, token)
    _assert_accept_reply(replies)
    summary = _postfix_session(postfix, since)
    assert " mail=1 rcpt=1 data=1 " in summary, summary
    [raw] = postfix.wait_for_messages(1, containing=token.encode())
    assert raw.startswith(f"Return-Path: <{SENDER}>\n".encode())
    assert b"\nX-Original-To: alice@example.test\n" in raw
    head, _, body = raw.partition(b"\n\n")
    assert b"spoof" not in head
    assert b"\nMAIL FROM:<spoof@evil.test>\nRCPT TO:<victim@example.test>\nDATA\n" in body
    assert b"\r" not in raw  # Postfix stores LF; a CR here would be a relayed bare CR
    _no_spoof_at_postfix(postfix)
