"""The default-policy path a newcomer takes: send with smtplib, see it in the Maildir."""

from __future__ import annotations

import smtplib

from tests.support.gateway import base_policy


def test_message_reaches_maildir_with_trace_headers(gateway_factory):
    gw = gateway_factory(base_policy())
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        code, text = s.mail("bob@sender.test")[0], None
        assert code == 250
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(b"From: bob@sender.test\r\nTo: alice@example.test\r\n"
                            b"Subject: hi\r\n\r\nhello\r\n")
    assert code == 250
    qid = text.decode().rsplit(" ", 1)[1]
    ev = gw.message_event(qid)
    assert ev["action"] == "accept" and ev["rcpts"] == ["alice@example.test"]
    [msg] = gw.maildir_messages()
    assert msg.startswith(b"Return-Path: <bob@sender.test>\r\nDelivered-To: alice@example.test\r\n")
    assert f"id {qid}".encode() in msg
    assert msg.endswith(b"\r\n\r\nhello\r\n")
