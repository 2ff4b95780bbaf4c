"""Forged Authentication-Results never reach the downstream (issue 25): a real gateway (proxy
relay, ``authres`` filter, authserv-id ``mailgate.example.test``) in front of a real sink. Each
message carries one forged header naming our authserv-id, written as a downstream reader could
still take it for ours (nested comments, quoted strings, folding, odd case, a version, values
the ``authres`` library cannot parse at all), beside a foreign header that must stay. What the
sink receives must hold exactly one Authentication-Results naming ``mailgate.example.test``
anywhere: ours, as the ``authres`` library reads it.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
import smtplib
from collections.abc import Iterator

import authres
import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

AUTHSERV = "mailgate.example.test"
FOREIGN = "lists.example.org; spf=pass smtp.mailfrom=list@lists.example.org"
FORGED = {
    "issue-repro": "(((((a) b) c) d) e) mailgate.example.test; dkim=pass header.d=bank.example",
    "deeper-comments": "(((((((((a) b) c) d) e) f) g) h) i) mailgate.example.test;"
                       " dkim=pass header.d=bank.example",
    "escaped-parens": r"(a \) (b) \( c) mailgate.example.test; dkim=pass header.d=bank.example",
    "quoted-string": 'mailgate.example.test; dkim=pass header.d=bank.example'
                     ' header.b="x; (y) mailgate.example.test"',
    "folded": "mailgate.example.test\r\n\t(comment\r\n (nested)) ;\r\n dkim=pass\r\n"
              "\theader.d=bank.example",
    "odd-case": "MailGate.EXAMPLE.test; DKIM=pass header.d=bank.example",
    "version": "mailgate.example.test 1; dkim=pass header.d=bank.example",
    "version-with-comments": "mailgate.example.test (x) 1 (y); dkim=pass header.d=bank.example",
    "unknown-version": "mailgate.example.test 2; dkim=pass header.d=bank.example",
    "no-semicolon": "mailgate.example.test dkim=pass header.d=bank.example",
    "trailing-dot": "mailgate.example.test.; dkim=pass header.d=bank.example",
    "too-deep": "(" * 80 + "x" + ")" * 80 + " mailgate.example.test; dkim=pass"
                " header.d=bank.example",
    "unbalanced": "((a) mailgate.example.test; dkim=pass header.d=bank.example",
}


def send(port: int, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.example.org")
        assert s.mail("sender@example.org")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        return s.data(data)


def header_values(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n")
            if line.split(":", 1)[0].strip().lower() == name.lower()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Sink]]:
    with Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            server={"hostname": AUTHSERV},
            filters=[{"name": "rcpt", "recipients": ["@example.test"]}, {"name": "authres"}])
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield gw, sink


def relayed_with(world: tuple[GatewayProcess, Sink], forged: str) -> bytes:
    """The message as the downstream got it, sent with ``forged`` and a foreign A-R."""
    gw, sink = world
    n = len(sink.messages) + 1
    message = (f"Authentication-Results: {forged}\r\n"
               f"Authentication-Results: {FOREIGN}\r\n"
               "From: sender@example.org\r\nTo: alice@example.test\r\n"
               "Subject: forged results\r\n\r\nhello\r\n").encode()
    code, reply = send(gw.address[1], message)
    assert code == 250, reply
    return sink.wait_for(n, timeout_s=10)[n - 1].data


@pytest.mark.parametrize("forged", list(FORGED.values()), ids=list(FORGED))
def test_only_our_authentication_results_reach_the_downstream(
        world: tuple[GatewayProcess, Sink], forged: str) -> None:
    data = relayed_with(world, forged)
    values = header_values(data, "Authentication-Results")
    naming_us = [v for v in values if AUTHSERV in v.lower()]
    assert len(naming_us) == 1, values
    ours = authres.all_features().parse_value(naming_us[0])
    assert ours.authserv_id == AUTHSERV and ours.results == []  # "mailgate.example.test; none"
    assert FOREIGN in values  # a foreign authserv-id stays
    assert b"bank.example" not in data


ENCODED = {
    # RFC 2047 has no place in Authentication-Results, but a reader with the stdlib's
    # email.policy.default (and others) decodes encoded words in any unstructured field
    "q-authserv-id": "=?us-ascii?q?mailgate.example.test?=; dkim=pass header.d=bank.example",
    "b-whole-value": "=?utf-8?b?"
                     + base64.b64encode(b"mailgate.example.test; dkim=pass "
                                        b"header.d=bank.example").decode() + "?=",
    "q-upper-case": "=?UTF-8?Q?MailGate=2Eexample=2Etest?= (x); dkim=pass header.d=bank.example",
}


@pytest.mark.parametrize("forged", list(ENCODED.values()), ids=list(ENCODED))
def test_encoded_words_naming_our_authserv_id_are_removed(
        world: tuple[GatewayProcess, Sink], forged: str) -> None:
    data = relayed_with(world, forged)
    read = email.message_from_bytes(data, policy=email.policy.default)
    values = [str(v) for v in read.get_all("Authentication-Results") or []]
    naming_us = [v for v in values if AUTHSERV in v.lower()]
    assert len(naming_us) == 1, values  # old code: the forged one too, as the reader decodes it
    assert authres.all_features().parse_value(naming_us[0]).results == []
    assert FOREIGN in values
