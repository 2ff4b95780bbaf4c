"""No open relay: only the accepted domains are accepted from untrusted clients, and no routing
trick (percent hack, bang path, quoted "@", source route, address literal) reaches another
destination. Trusted networks may relay, to the per-domain transport.

Codes (RFC 5321, RFC 3463; Postfix's choices where RFC 5321 leaves one open):
* another domain, sub-domains included: ``550 5.7.1 Relay access denied`` (Postfix
  ``reject_unauth_destination``);
* a routing trick in an accepted domain: ``550 5.7.1 Relay access denied: <trick> not accepted``
  (Postfix ``allow_untrusted_routing = no``);
* a path that is not RFC 5321 syntax (a trailing dot in the domain): ``501 5.1.3``.
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

SENDER = "bob@sender.test"


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def _policy(sink: Sink, **extra: Any) -> dict[str, Any]:
    return base_policy(f"smtp://127.0.0.1:{sink.port}",
                       limits={"idle_timeout_s": 5, "command_timeout_s": 5}, **extra)


@pytest.fixture
def gw(gateway_factory, sink) -> GatewayProcess:
    return gateway_factory(_policy(sink))


def _session(gw: GatewayProcess) -> smtplib.SMTP:
    s = smtplib.SMTP(*gw.address, timeout=10)
    s.ehlo("client.test")
    code, _ = s.mail(SENDER)
    assert code == 250
    return s


def _rcpt(s: smtplib.SMTP, path: str) -> str:
    """Send ``RCPT TO:<path>`` exactly as written (smtplib.rcpt() would re-quote it)."""
    code, text = s.docmd("RCPT", f"TO:<{path}>")
    return f"{code} {text.decode()}"


# -- untrusted client (default policy: no trusted networks) ---------------------------------------

def test_smtplib_relay_to_another_domain_is_refused(gw, sink):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail(SENDER, ["someone@other.test"], b"Subject: relay?\r\n\r\nx\r\n")
    code, text = refused.value.recipients["someone@other.test"]
    assert code == 550
    assert text.startswith(b"5.7.1 Relay access denied (")
    assert sink.messages == []
    assert sink.connections == 0  # the downstream was never even opened
    ev = gw.message_event()
    assert ev["rcpts"] == [] and ev["rcpt_refused"] == 1 and ev["relay"] == "not relayed"


REFUSED = [
    # (recipient path, exact reply without the trailing "(qid)")
    ("someone@other.test", "550 5.7.1 Relay access denied"),
    ("a@sub.example.test", "550 5.7.1 Relay access denied"),
    ("alice@example.test.other.test", "550 5.7.1 Relay access denied"),
    ("user%other.test@example.test", "550 5.7.1 Relay access denied: percent-hack not accepted"),
    ("other.test!user@example.test", "550 5.7.1 Relay access denied: bang-path not accepted"),
    ('"user@other.test"@example.test', "550 5.7.1 Relay access denied: quoted-at not accepted"),
    ('"user%other.test"@example.test',
     "550 5.7.1 Relay access denied: percent-hack not accepted"),
    ("@example.test:user@other.test", "550 5.7.1 Relay access denied: source-route not accepted"),
    ("@a.test,@b.test:user@example.test",
     "550 5.7.1 Relay access denied: source-route not accepted"),
    ("user@[127.0.0.1]", "550 5.7.1 Relay access denied: address-literal not accepted"),
    ("user@[IPv6:::1]", "550 5.7.1 Relay access denied: address-literal not accepted"),
    ("user%other.test@[127.0.0.1]",
     "550 5.7.1 Relay access denied: percent-hack, address-literal not accepted"),
]


@pytest.mark.parametrize(("path", "expected"), REFUSED, ids=[p for p, _ in REFUSED])
def test_untrusted_relay_attempts_are_refused(gw, sink, path, expected):
    s = _session(gw)
    reply = _rcpt(s, path)
    assert reply.startswith(expected + " ("), reply  # ... "(qid)"
    assert reply.endswith(")")
    # a good recipient still works in the same transaction, and only it is relayed
    assert _rcpt(s, "alice@example.test").startswith("250 2.1.5")
    code, text = s.data(b"From: bob@sender.test\r\nSubject: relay test\r\n\r\nbody\r\n")
    assert code == 250, text
    s.quit()
    [msg] = sink.wait_for(1)
    assert msg.rcpts == ("alice@example.test",)
    assert [c for c in sink.commands if c.startswith("RCPT")] == ["RCPT TO:<alice@example.test>"]
    ev = gw.message_event()
    assert ev["rcpts"] == ["alice@example.test"] and ev["rcpt_refused"] == 1


def test_no_refused_recipient_reaches_the_sink(gw, sink):
    """All the tricks in one transaction: nothing valid, so no DATA and no downstream at all."""
    s = _session(gw)
    for path, expected in REFUSED:
        assert _rcpt(s, path).startswith(expected + " ("), path
    code, text = s.docmd("DATA")
    assert (code, text) == (554, b"5.5.1 No valid recipients")
    s.quit()
    assert sink.connections == 0 and sink.messages == [] and sink.commands == []
    ev = gw.message_event()
    assert ev["rcpts"] == [] and ev["rcpt_refused"] == len(REFUSED)


BAD_SYNTAX = [
    # RFC 5321 4.1.2: Domain = sub-domain *("." sub-domain) -- no trailing dot. Postfix would
    # strip it; mailgate refuses the path as written rather than guess.
    "alice@example.test.",
    "alice@other.test.",
    "user@other.test@example.test",  # a second "@" outside quotes
    "user@example.test@other.test",
    "alice",  # only Postmaster may go without a domain
    "@other.test:",  # a source route without a mailbox
    "user@[127.0.0.1",  # unbalanced address literal
    "user@[IPv6:::1%eth0]",  # a scope id
    "user@[mail:other.test]",  # a General-address-literal
]


@pytest.mark.parametrize("path", BAD_SYNTAX)
def test_malformed_paths_are_syntax_errors(gw, sink, path):
    s = _session(gw)
    assert _rcpt(s, path) == "501 5.1.3 Bad recipient address syntax"
    assert _rcpt(s, "alice@example.test").startswith("250 2.1.5")  # the session is fine
    s.quit()
    assert not [c for c in sink.commands if c.startswith("RCPT") and "alice@example.test>" not in c]


def test_domain_match_is_case_insensitive(gw, sink):
    s = _session(gw)
    assert _rcpt(s, "alice@EXAMPLE.TEST").startswith("250 2.1.5")
    assert _rcpt(s, "Bob@Example.Test").startswith("250 2.1.5")
    code, _ = s.data(b"Subject: case\r\n\r\nx\r\n")
    assert code == 250
    s.quit()
    [msg] = sink.wait_for(1)
    assert msg.rcpts == ("alice@EXAMPLE.TEST", "Bob@Example.Test")  # passed on as written


def test_bare_postmaster_is_accepted_and_delivered(gw, sink):
    """RFC 5321 4.5.1: <Postmaster> without a domain must be accepted."""
    s = _session(gw)
    assert _rcpt(s, "Postmaster").startswith("250 2.1.5")
    code, _ = s.data(b"Subject: to the postmaster\r\n\r\nhello\r\n")
    assert code == 250
    s.quit()
    [msg] = sink.wait_for(1)
    assert msg.rcpts == ("Postmaster",)
    assert "RCPT TO:<Postmaster>" in sink.commands


def test_raw_relay_attempt_without_ehlo_state(gw, sink):
    """The same refusal over a raw socket with HELO (not EHLO), pipelined commands ignored."""
    with socket.create_connection(gw.address, timeout=10) as c:
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        c.sendall(b"HELO client.test\r\nMAIL FROM:<bob@sender.test>\r\n"
                  b"RCPT TO:<victim@other.test>\r\nDATA\r\nQUIT\r\n")
        lines = [f.readline() for _ in range(5)]
    assert lines[0].startswith(b"250 ")
    assert lines[1].startswith(b"250 2.1.0")
    assert lines[2].startswith(b"550 5.7.1 Relay access denied (")
    assert lines[3] == b"554 5.5.1 No valid recipients\r\n"
    assert lines[4].startswith(b"221 ")
    assert sink.connections == 0


# -- trusted networks -----------------------------------------------------------------------------

@pytest.fixture
def other_sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


@pytest.fixture
def trusted_gw(gateway_factory, sink, other_sink) -> GatewayProcess:
    return gateway_factory(_policy(
        sink, domains={"accepted": ["example.test"], "trusted_networks": ["127.0.0.0/8"]},
        relay={"transport": {"other.test": f"smtp://127.0.0.1:{other_sink.port}"}}))


def test_trusted_client_relays_to_the_domain_transport(trusted_gw, sink, other_sink):
    with smtplib.SMTP(*trusted_gw.address, timeout=10) as s:
        refused = s.sendmail(SENDER, ["carol@other.test"], b"Subject: relayed\r\n\r\nout\r\n")
    assert refused == {}
    [msg] = other_sink.wait_for(1)
    assert msg.mail_from == SENDER and msg.rcpts == ("carol@other.test",)
    assert msg.data.endswith(b"\r\n\r\nout\r\n")
    assert sink.connections == 0  # the default downstream was not used
    conn = trusted_gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["accepted"] == 1


def test_trusted_client_may_relay_to_domains_without_a_transport(trusted_gw, sink, other_sink):
    """Trusted means "may relay anywhere": a domain with no transport entry goes to the
    default downstream (the smart host)."""
    with smtplib.SMTP(*trusted_gw.address, timeout=10) as s:
        assert s.sendmail(SENDER, ["dave@elsewhere.test"], b"Subject: x\r\n\r\ny\r\n") == {}
    [msg] = sink.wait_for(1)
    assert msg.rcpts == ("dave@elsewhere.test",)
    assert other_sink.connections == 0


TRUSTED_TRICKS = [
    # (path, the RCPT the downstream must see, which sink) -- passed on as written: the next
    # hop (whose own routing rules apply) decides, as Postfix does for mynetworks clients.
    ("user%other.test@example.test", "RCPT TO:<user%other.test@example.test>", "default"),
    ("other.test!user@example.test", "RCPT TO:<other.test!user@example.test>", "default"),
    ('"user@other.test"@example.test', 'RCPT TO:<"user@other.test"@example.test>', "default"),
    ("@example.test:user@other.test", "RCPT TO:<user@other.test>", "other"),  # route ignored
    ("user@[127.0.0.1]", "RCPT TO:<user@[127.0.0.1]>", "default"),
]


@pytest.mark.parametrize(("path", "seen", "where"), TRUSTED_TRICKS,
                         ids=[p for p, _, _ in TRUSTED_TRICKS])
def test_trusted_client_routing_forms_are_passed_on(trusted_gw, sink, other_sink, path, seen,
                                                    where):
    with smtplib.SMTP(*trusted_gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER)[0] == 250
        assert _rcpt(s, path).startswith("250 2.1.5")
        code, _ = s.data(b"Subject: routed\r\n\r\nz\r\n")
        assert code == 250
    target, idle = (sink, other_sink) if where == "default" else (other_sink, sink)
    [msg] = target.wait_for(1)
    assert seen in target.commands
    assert idle.connections == 0
