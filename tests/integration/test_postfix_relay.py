"""The gateway in proxy mode in front of a real Postfix (tests/support/postfix.py), spoken to by
swaks: the message lands in Postfix's Maildir with the gateway's Received header and qid, and
Postfix's own recipient refusals come back to the client at RCPT.
"""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.postfix import PostfixInstance, postfix_available, postfix_unavailable_reason

SWAKS = shutil.which("swaks")

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.swaks,
    pytest.mark.skipif(not postfix_available(),
                       reason=f"private Postfix unavailable: {postfix_unavailable_reason()}"),
    pytest.mark.skipif(SWAKS is None, reason="swaks not installed"),
]

REFUSED = "nobody@example.test"  # Postfix refuses it through an access map
UNSERVED = "carol@example.org"  # the gateway accepts example.org, Postfix does not serve it


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    options = {"smtpd_recipient_restrictions":
               f"check_recipient_access inline:{{ {{ {REFUSED} = "
               "550 5.1.1 mailbox unavailable } }"}
    with PostfixInstance(tmp_path_factory.mktemp("postfix"), domains=("example.test",),
                         smtpd_options=options) as pf:
        yield pf


@pytest.fixture(scope="module")
def gateway(postfix: PostfixInstance, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[GatewayProcess]:
    policy = base_policy(downstream=f"smtp://127.0.0.1:{postfix.port}",
                         domains={"accepted": ["example.test", "example.org"]})
    with GatewayProcess(tmp_path_factory.mktemp("gateway"), policy) as gw:
        yield gw


def swaks(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    assert SWAKS is not None
    return subprocess.run(
        [SWAKS, "--server", f"{gw.host}:{gw.port}", "--helo", "client.test",
         "--from", "bob@sender.test", "--timeout", "20", *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_swaks_message_lands_in_postfix_maildir_with_our_trace(gateway: GatewayProcess,
                                                                postfix: PostfixInstance):
    token = uuid.uuid4().hex
    res = swaks(gateway, "--to", "alice@example.test",
                "--header", f"Subject: via mailgate {token}",
                "--body", f"Hello through the gateway. {token}")
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\S+)", res.stdout)
    assert m is not None, res.stdout
    qid = m[1]
    [raw] = postfix.wait_for_messages(1, containing=token.encode())
    msg = email.message_from_bytes(raw)
    assert msg["Delivered-To"] == "alice@example.test"
    assert msg["Return-Path"] == "<bob@sender.test>"
    assert msg["Subject"] == f"via mailgate {token}"
    received = [" ".join(r.split()) for r in msg.get_all("Received") or []]
    # Postfix's own Received (it got the message from us) on top, ours right below it
    assert received[0].startswith("from mx.gateway.test (unknown [127.0.0.1]) "
                                  "by downstream.mailgate.test (Postfix) with ESMTP id ")
    assert received[1].startswith(f"from client.test ([127.0.0.1]) by mx.gateway.test "
                                  f"(mailgate) with ESMTP id {qid} for <alice@example.test>;")
    assert msg["X-Spam-Status"].startswith("No, ")
    assert f"Hello through the gateway. {token}" in msg.get_payload()
    ev = gateway.message_event(qid)
    assert ev["action"] == "accept"
    assert re.match(r"250 2\.0\.0 Ok: queued as [0-9A-F]+$", ev["relay"]), ev["relay"]
    # the id Postfix queued it under appears in its log as received from the gateway
    postfix_qid = ev["relay"].rsplit(" ", 1)[1]
    postfix.wait_for_log(rf"{postfix_qid}: .*status=sent")


@pytest.mark.parametrize(("rcpt", "code", "status", "text"), [
    (REFUSED, "550", "5.1.1", "Recipient address rejected: mailbox unavailable"),
    (UNSERVED, "550", "5.1.1", "Recipient address rejected"),
])
def test_postfix_rcpt_refusal_is_passed_back(gateway: GatewayProcess, postfix: PostfixInstance,
                                             rcpt: str, code: str, status: str, text: str):
    token = uuid.uuid4().hex
    before = len(postfix.messages())
    res = swaks(gateway, "--to", f"alice@example.test,{rcpt}",
                "--body", f"one good, one refused {token}")
    # swaks exits 0 when at least one recipient was accepted and the message was sent
    assert res.returncode == 0, res.stdout + res.stderr
    refused = re.search(rf"<\*\* +({code}) ({re.escape(status)}) (.*)", res.stdout)
    assert refused is not None, res.stdout
    assert f"<{rcpt}>" in refused[3] and text in refused[3], refused[0]
    m = re.search(r"<-  250 2\.0\.0 Ok: queued as (\S+)", res.stdout)
    assert m is not None, res.stdout
    [raw] = postfix.wait_for_messages(1, containing=token.encode())
    assert email.message_from_bytes(raw)["Delivered-To"] == "alice@example.test"
    ev = gateway.message_event(m[1])
    assert ev["rcpts"] == ["alice@example.test"] and ev["rcpt_refused"] == 1
    assert len(postfix.messages()) == before + 1


def test_only_refused_recipient_gets_5xx_and_nothing_is_sent(gateway: GatewayProcess,
                                                             postfix: PostfixInstance):
    res = swaks(gateway, "--to", REFUSED)
    assert res.returncode == 24, res.stdout + res.stderr  # swaks: no recipient accepted
    assert re.search(r"<\*\* +550 5\.1\.1 <nobody@example\.test>: Recipient address rejected",
                     res.stdout), res.stdout
    assert "<-  354" not in res.stdout  # (not just "354": the port may contain it)
