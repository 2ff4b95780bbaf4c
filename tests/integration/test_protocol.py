"""SMTP protocol conformance of the front end, over raw loopback sockets: enhanced status codes
on every reply, command sequencing, MAIL parameters, SMTPUTF8, PIPELINING, half-close, and that
exception text from a filter never reaches the client.

Choices where RFC 5321 allows more than one answer:
* DATA with no RCPT given at all: ``503 5.5.1`` (bad sequence); DATA after every RCPT was
  refused: ``554 5.5.1`` (no valid recipients) -- RFC 5321 3.3 allows either reply for both.
* The HELO reply, like the EHLO reply and the greeting, carries no enhanced status code
  (RFC 2034 3: "except the initial greeting and any response to HELO or EHLO"); so does 354.
"""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink
from tests.support.smtpclient import RawSmtpClient

SENDER = "bob@sender.test"
ALICE = "alice@example.test"
CAROL = "carol@example.test"
BODY = (b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: protocol\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <p@sender.test>\r\n\r\nhello\r\n")
ENHANCED = re.compile(r"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3} \S")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as ([0-9A-Z]{16})$")
TEMPFAIL = re.compile(r"^451 4\.3\.0 [^\r\n]* \(([0-9A-Z]{16})\)$")


def policy(**sections: Any) -> dict[str, Any]:
    p = base_policy(**sections)
    p["filters"][0] = {"name": "rcpt", "recipients": [ALICE, CAROL, "jø@example.test"]}
    return p


def hello(c: RawSmtpClient) -> list[str]:
    c.send("EHLO client.test\r\n")
    lines = c.reply_lines()
    assert lines[-1].startswith("250 ")
    return lines


# -- enhanced status codes ------------------------------------------------------------------------

def test_every_reply_has_an_enhanced_status_code(gateway_factory):
    gw = gateway_factory(policy(limits={"max_invalid_commands": 100}))
    script: list[tuple[bytes, str, bool]] = [  # command, expected code, exempt from the check
        (b"NOOP", "250", False),
        (b"HELP", "214", False),
        (b"VRFY bob", "252", False),
        (b"EXPN staff", "502", False),
        (b"FOO bar", "500", False),
        (b"MAIL FROM:<a@sender.test>", "503", False),
        (b"EHLO", "501", False),
        (b"HELO client.test", "250", True),
        (b"MAIL FROM:<a@sender.test> SIZE=10", "501", False),
        (b"EHLO client.test", "250", True),
        (b"RCPT TO:<alice@example.test>", "503", False),
        (b"DATA", "503", False),
        (b"MAIL FROM:<not an address>", "501", False),
        (b"MAIL FROM:<a@sender.test> BODY=BINARYMIME", "555", False),
        (b"MAIL FROM:<a@sender.test> FOO=BAR", "555", False),
        (b"MAIL FROM:<a@sender.test> SIZE=100 BODY=8BITMIME", "250", False),
        (b"MAIL FROM:<a@sender.test>", "503", False),
        (b"DATA", "503", False),
        (b"RCPT TO:<nobody@example.test>", "550", False),
        (b"RCPT TO:<someone@elsewhere.test>", "550", False),
        (b"RCPT TO:<alice@example.test> XFOO=1", "555", False),
        (b"RCPT TO:alice", "501", False),
        (b"RCPT TO:<alice@example.test>", "250", False),
        (b"DATA now", "501", False),
        (b"DATA", "354", True),
        (BODY + b".", "250", False),
        (b"MAIL FROM:<>", "250", False),
        (b"RCPT TO:<nobody@example.test>", "550", False),
        (b"DATA", "554", False),
        (b"RSET", "250", False),
        (b"RSET now", "501", False),
        (b"STARTTLS", "502", False),
        (b"AUTH PLAIN AGJvYgBzZWNyZXQ=", "502", False),
        (b"VRFY", "501", False),
        (b"NOOP " + b"x" * 3000, "500", False),
        (b"NO\0OP", "500", False),
        (b"NOOP \xff\xfe", "250", False),
        (b"QUIT", "221", False),
    ]
    seen: list[tuple[bytes, list[str]]] = []
    with RawSmtpClient(gw.address) as c:
        assert c.greeting == "220 mx.gateway.test ESMTP mailgate"
        for command, code, exempt in script:
            c.send(command + b"\r\n")
            lines = c.reply_lines()
            seen.append((command[:40], lines))
            assert all(x[:3] == code for x in lines), (command[:60], lines)
            if not exempt:
                bad = [x for x in lines if not ENHANCED.match(x)]
                assert not bad, (command[:60], bad)
        assert c.rest() == []
    assert len(gw.maildir_messages()) == 1
    assert gw.wait_for(lambda e: e.get("event") == "connection")["end"] == "quit"


def test_refusals_carry_enhanced_codes_too(gateway_factory):
    """The replies given while refusing a connection or closing one also carry status codes."""
    gw = gateway_factory(policy(limits={"max_connections_per_ip": 1, "idle_timeout_s": 1}))
    with RawSmtpClient(gw.address) as c1:
        refused = socket.create_connection(gw.address, 5)
        data = refused.recv(1000)
        refused.close()
        assert ENHANCED.match(data.decode()), data
        assert ENHANCED.match(c1.reply_lines()[0])  # 421 4.4.2 idle timeout


# -- sequencing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("commands, expected", [
    (["MAIL FROM:<a@sender.test>"], "503 5.5.1 Send HELO/EHLO first"),
    (["EHLO c.test", "MAIL FROM:<a@sender.test>", "MAIL FROM:<a@sender.test>"],
     "503 5.5.1 Nested MAIL command"),
    (["EHLO c.test", "RCPT TO:<alice@example.test>"], "503 5.5.1 Need MAIL command"),
    (["EHLO c.test", "DATA"], "503 5.5.1 Need MAIL command"),
    (["EHLO c.test", "MAIL FROM:<a@sender.test>", "DATA"], "503 5.5.1 Need RCPT command"),
    (["EHLO c.test", "MAIL FROM:<a@sender.test>", "RCPT TO:<x@example.test>",
      "RCPT TO:<y@elsewhere.test>", "DATA"], "554 5.5.1 No valid recipients"),
    (["FROB"], "500 5.5.2 Syntax error, command unrecognized"),
    (["EHLO"], "501 5.5.4 Syntax: EHLO hostname"),
    (["HELO"], "501 5.5.4 Syntax: HELO hostname"),
    (["EHLO two words"], "501 5.5.4 Syntax: EHLO hostname"),
    (["VRFY alice"], "252 2.5.0 Cannot VRFY user, but will try RCPT"),
    (["EXPN staff"], "502 5.5.1 Command not implemented"),
    (["NOOP"], "250 2.0.0 Ok"),
    (["noop"], "250 2.0.0 Ok"),
    (["RSET"], "250 2.0.0 Ok"),
    (["QUIT"], "221 2.0.0 Bye"),
], ids=lambda v: v if isinstance(v, str) else "+".join(x.split()[0] for x in v))
def test_command_replies(gateway_factory, commands, expected):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        for command in commands[:-1]:
            c.cmd(command)
        assert c.cmd(commands[-1]) == expected
        if expected.startswith("221"):
            assert c.rest() == []
        else:  # still serving the session
            assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_help(gateway_factory):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        c.send("HELP\r\n")
        [line] = c.reply_lines()
    assert line.startswith("214 2.0.0 ")


def test_rset_ends_the_transaction(gateway_factory):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        hello(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
        assert c.cmd("RSET") == "250 2.0.0 Ok"
        assert c.cmd("DATA") == "503 5.5.1 Need MAIL command"
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"  # not nested
    assert gw.maildir_messages() == []


# -- MAIL parameters -------------------------------------------------------------------------------

def test_mail_parameters_reach_the_downstream(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(policy(relay={"downstream": f"smtp://127.0.0.1:{sink.port}"}))
        body = BODY.replace(b"hello", "héllo wörld".encode())
        with RawSmtpClient(gw.address) as c:
            hello(c)
            assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={len(body)} BODY=8BITMIME") == \
                "250 2.1.0 Sender ok"
            assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
            assert c.cmd("DATA").startswith("354 ")
            assert QUEUED.match(c.cmd(body + b"."))
        [msg] = sink.wait_for(1)
    assert msg.mail_from == SENDER and msg.rcpts == (ALICE,)
    assert set(msg.mail_params) == {f"SIZE={len(body)}", "BODY=8BITMIME"}
    assert msg.data.endswith("héllo wörld\r\n".encode())


@pytest.mark.parametrize("params, expected", [
    ("BODY=BINARYMIME", "555 5.5.4 BODY must be 7BIT or 8BITMIME"),
    ("BODY=", "501 5.5.4 Bad parameter syntax"),
    ("FOO=BAR", "555 5.5.4 Unsupported MAIL parameter FOO"),
    ("RET=SOME", "501 5.5.4 Bad RET parameter"),
    ("ENVID=bad+ZZ", "501 5.5.4 Bad ENVID parameter"),
    ("XFOO=1", "555 5.5.4 Unsupported MAIL parameter XFOO"),
    ("SIZE=abc", "501 5.5.4 Bad SIZE parameter"),
    ("SMTPUTF8=yes", "501 5.5.4 Bad parameter syntax"),
])
def test_bad_mail_parameters(gateway_factory, params, expected):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        hello(c)
        assert c.cmd(f"MAIL FROM:<{SENDER}> {params}") == expected
        assert c.cmd(f"RCPT TO:<{ALICE}>") == "503 5.5.1 Need MAIL command"  # no transaction
        assert c.cmd(f"MAIL FROM:<{SENDER}> BODY=7BIT") == "250 2.1.0 Sender ok"


@pytest.mark.parametrize("params", ["SIZE=100", "BODY=8BITMIME"])
def test_mail_parameters_need_ehlo(gateway_factory, params):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        assert c.cmd("HELO client.test") == "250 mx.gateway.test"
        assert c.cmd(f"MAIL FROM:<{SENDER}> {params}") == "501 5.5.4 Parameters need EHLO"
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"


# -- SMTPUTF8 --------------------------------------------------------------------------------------

def test_smtputf8_delivered_to_a_sink_that_offers_it(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(policy(relay={"downstream": f"smtp://127.0.0.1:{sink.port}"}))
        with RawSmtpClient(gw.address) as c:
            assert "250-SMTPUTF8" in hello(c)
            assert c.cmd("MAIL FROM:<bø@sender.test> SMTPUTF8") == "250 2.1.0 Sender ok"
            assert c.cmd("RCPT TO:<jø@example.test>") == "250 2.1.5 Recipient ok"
            assert c.cmd("DATA").startswith("354 ")
            final = c.cmd("From: bø@sender.test\r\nSubject: ø\r\n\r\nhej\r\n.".encode())
            assert QUEUED.match(final), final
        [msg] = sink.wait_for(1)
    assert msg.mail_from == "bø@sender.test" and msg.rcpts == ("jø@example.test",)
    assert "SMTPUTF8" in msg.mail_params
    assert msg.data.endswith("From: bø@sender.test\r\nSubject: ø\r\n\r\nhej\r\n".encode())
    assert re.search(rb"^Received: [^\r]* with\s+UTF8SMTP id ", msg.data)


def test_utf8_address_without_smtputf8_parameter(gateway_factory):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        hello(c)
        assert c.cmd("MAIL FROM:<bø@sender.test>") == \
            "550 5.6.7 Non-ASCII addresses not permitted for that sender"
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd("RCPT TO:<jø@example.test>") == \
            "553 5.6.7 Non-ASCII addresses not permitted for that recipient"


def test_smtputf8_to_a_downstream_without_it_is_refused(gateway_factory):
    with Sink(ehlo_extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")) as sink:
        gw = gateway_factory(policy(relay={"downstream": f"smtp://127.0.0.1:{sink.port}"}))
        with RawSmtpClient(gw.address) as c:
            hello(c)
            assert c.cmd("MAIL FROM:<bø@sender.test> SMTPUTF8") == "250 2.1.0 Sender ok"
            reply = c.cmd("RCPT TO:<jø@example.test>")
            assert reply.startswith("553 5.6.7 Downstream does not support SMTPUTF8"), reply
        assert sink.messages == []


# -- pipelining and half-close ---------------------------------------------------------------------

def test_pipelined_commands_get_replies_in_order(gateway_factory):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        assert "250-PIPELINING" in hello(c)
        c.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<nobody@example.test>\r\n"
               f"RCPT TO:<{CAROL}>\r\nDATA\r\n")
        assert c.reply() == "250 2.1.0 Sender ok"
        assert c.reply() == "250 2.1.5 Recipient ok"
        [unknown] = c.reply_lines()
        assert unknown.startswith("550 5.1.1 <nobody@example.test>: Recipient address rejected")
        assert c.reply() == "250 2.1.5 Recipient ok"
        assert c.reply_lines()[0].startswith("354 ")
        c.send(BODY + b".\r\nNOOP\r\nMAIL FROM:<>\r\nQUIT\r\n")
        assert QUEUED.match(c.reply_lines()[0])
        assert c.reply() == "250 2.0.0 Ok"
        assert c.reply() == "250 2.1.0 Sender ok"
        assert c.reply() == "221 2.0.0 Bye"
        assert c.rest() == []
    delivered = gw.maildir_messages()
    assert len(delivered) == 2
    assert all(m.endswith(b"\r\n\r\nhello\r\n") for m in delivered)


@pytest.mark.parametrize("quit_", [True, False], ids=["with-quit", "without-quit"])
def test_half_close_still_gets_every_reply(gateway_factory, quit_):
    gw = gateway_factory(policy())
    with RawSmtpClient(gw.address) as c:
        c.send(f"EHLO client.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
               .encode() + BODY + b".\r\nNOOP\r\n" + (b"QUIT\r\n" if quit_ else b""))
        c.sock.shutdown(socket.SHUT_WR)
        replies = c.rest()  # every reply up to EOF; EOFError if the last one is cut short
    finals = [r.split("\n")[-1] for r in replies]  # the last line of each reply
    assert finals[0] == "250 DSN"  # the end of the EHLO reply
    assert finals[1:4] == ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok",
                           "354 End data with <CR><LF>.<CR><LF>"]
    assert QUEUED.match(finals[4])
    assert finals[5:] == ["250 2.0.0 Ok"] + (["221 2.0.0 Bye"] if quit_ else [])
    assert len(gw.maildir_messages()) == 1
    assert gw.wait_for(lambda e: e.get("event") == "connection")["end"] == \
        ("quit" if quit_ else "eof")


# -- exception text never reaches the client --------------------------------------------------------

SECRET = "secret-detail-xyz"

RAISING_PLUGIN = textwrap.dedent('''
    """Test filters that fail: an exception at RCPT or at end of data, or a broken edit."""
    from gateway.filterapi import AddHeader, Filter, Result


    class Boom(Filter):
        name = "boom"

        def __init__(self, stage):
            self.stage = stage

        @classmethod
        def from_config(cls, cfg, services):
            return cls(cfg.get("stage", "rcpt"))

        async def on_rcpt(self, ctx):
            if self.stage == "rcpt":
                raise ValueError("secret-detail-xyz")
            return Result()

        async def on_message(self, ctx):
            if self.stage == "message":
                raise ValueError("secret-detail-xyz")
            if self.stage == "edit":
                return Result(edits=(AddHeader(BadName("X-Boom"), "v"),))
            return Result()


    class BadName(str):
        """A header name that blows up when the core renders it: outside the pipeline."""

        def __format__(self, spec):
            raise ValueError("secret-detail-xyz")
''')


def boom_gateway(gateway_factory: Any, tmp_path: Path, stage: str, on_error: str
                 ) -> GatewayProcess:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "boom.py").write_text(RAISING_PLUGIN)
    p = policy(plugins={"dirs": [str(plugins)]})
    p["filters"].append({"name": "boom", "stage": stage, "on_error": on_error})
    return gateway_factory(p)


def transact(c: RawSmtpClient) -> list[str]:
    """EHLO, MAIL, RCPT and (if RCPT got 250) DATA; the replies to MAIL, RCPT, end of data."""
    hello(c)
    out = [c.cmd(f"MAIL FROM:<{SENDER}>"), c.cmd(f"RCPT TO:<{ALICE}>")]
    if out[-1].startswith("250"):
        assert c.cmd("DATA").startswith("354 ")
        out.append(c.cmd(BODY + b"."))
    return out


@pytest.mark.parametrize("stage, on_error", [
    ("rcpt", "tempfail"), ("message", "tempfail"), ("rcpt", "reject"),
    ("message", "continue"), ("edit", "tempfail"),
])
def test_filter_exception_text_never_reaches_the_client(gateway_factory, tmp_path, stage,
                                                        on_error):
    gw = boom_gateway(gateway_factory, tmp_path, stage, on_error)
    with RawSmtpClient(gw.address) as c:
        replies = transact(c)
        assert c.cmd("NOOP") == "250 2.0.0 Ok"  # the session survives
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
        c.rest()
        received = bytes(c.received)
    assert SECRET.encode() not in received
    final = replies[-1]
    if on_error == "continue":
        m = QUEUED.match(final)
        assert m, final
        assert len(gw.maildir_messages()) == 1
        ev = gw.message_event(m.group(1))
        assert "BOOM_ERROR(0)[error]" in ev["symbols"]
    else:
        if on_error == "reject":
            m = re.match(r"^550 5\.7\.0 Message refused \(([0-9A-Z]{16})\)$", final)
        else:
            m = TEMPFAIL.match(final)
        assert m, final
        assert gw.maildir_messages() == []
        gw.message_event(m.group(1))  # logged under the qid the client was given
    # The detail is in the gateway's log, next to the qid.
    gw.wait_for(lambda e: SECRET in str(e) and m.group(1) in str(e))
