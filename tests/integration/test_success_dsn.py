"""NOTIFY=SUCCESS gets its DSN (RFC 3461 §5.2, RFC 3464), in queue and proxy mode, with real
downstreams: an SMTP sink that does not offer DSN gets the message and the sender gets a
``relayed`` report (from <>, multipart/report; report-type=delivery-status, Status 2.0.0,
Original-Recipient from ORCPT); an LMTP sink without DSN and a Maildir give ``delivered``. A
downstream that offers DSN gets NOTIFY/ORCPT/RET/ENVID and no report comes from us; nor does
one without NOTIFY=SUCCESS, nor one for the null sender. The same with a real Postfix
downstream (tests/support/postfix.py): its own success report carries the ENVID and ORCPT."""

from __future__ import annotations

import email
import email.policy
import re
import time

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.postfix import PostfixInstance, postfix_available, postfix_unavailable_reason
from tests.support.sink import DEFAULT_EXTENSIONS, Sink
from tests.support.smtpclient import RawSmtpClient

SENDER = "bob@sender.test"
BODY = (b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: quarterly figures\r\n"
        b"Message-ID: <fig1@sender.test>\r\nDate: Tue, 08 Dec 2026 10:00:00 +0000\r\n\r\n"
        b"The figures are attached in spirit.\r\n.\r\n")
ORCPT_MAIL = "MAIL FROM:<bob@sender.test> RET=HDRS ENVID=figures+2B1"
ORCPT_RCPT = "RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+2Bq@example.test"


def send(gw: GatewayProcess, mail: str = ORCPT_MAIL, rcpt: str = ORCPT_RCPT) -> str:
    with RawSmtpClient(gw.address) as c:
        c.cmd("EHLO client.test")
        assert c.cmd(mail).startswith("250 "), mail
        assert c.cmd(rcpt).startswith("250 "), rcpt
        assert c.cmd("DATA").startswith("354")
        c.send(BODY)
        end = c.reply()
        c.cmd("QUIT")
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", end)
    assert m, end
    return m[1]


def policy(downstream: str, mode: str) -> dict:
    return base_policy(downstream, relay={"mode": mode}, queue={"scan_interval_s": 0.2})


def delivered(gw: GatewayProcess, qid: str, mode: str) -> None:
    """The original's delivery is over (a success DSN, if any, is queued before that)."""
    if mode == "queue":
        gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid, 15)


def check_report(raw: bytes, action: str, status: str = "2.0.0") -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == SENDER and msg["Subject"] == "Successful Mail Delivery Report"
    [part] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    text = part.as_string()
    for line in (f"Action: {action}", f"Status: {status}",
                 "Original-Recipient: rfc822; alice+q@example.test",
                 "Final-Recipient: rfc822; alice@example.test",
                 "Original-Envelope-Id: figures+1"):
        assert re.search(rf"^{re.escape(line)}\r?$", text, re.M), (line, text)
    headers = [p for p in msg.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert headers and b"Subject: quarterly figures" in headers[0].get_payload(decode=True)


@pytest.mark.parametrize("mode", ["queue", "proxy"])
@pytest.mark.parametrize("lmtp, action, status", [
    (False, "relayed", "2.0.0"),
    (True, "delivered", "2.1.5"),  # the LMTP sink's own per-recipient status, as it said it
])
def test_success_report_when_the_downstream_cannot_take_notify(gateway_factory, mode, lmtp,
                                                                action, status):
    with Sink(lmtp=lmtp) as sink:  # no DSN in its EHLO/LHLO
        scheme = "lmtp" if lmtp else "smtp"
        gw = gateway_factory(policy(f"{scheme}://127.0.0.1:{sink.port}", mode))
        qid = send(gw)
        original, report = sink.wait_for(2, 15)
    assert original.mail_from == SENDER and original.rcpts == ("alice@example.test",)
    assert original.rcpt_params == ((),)  # the downstream cannot be asked: nothing passed
    assert (report.mail_from, report.rcpts) == ("", (SENDER,))  # from <>, to the sender
    check_report(report.data, action, status)
    assert re.search(rb"^Diagnostic-Code: smtp; 250 " + status.encode(), report.data, re.M)
    # RFC 3461 6.3 e: the server that said 250, beside its reply (an address as a literal)
    assert re.search(rb"^Remote-MTA: dns; \[127\.0\.0\.1\]\r?$", report.data, re.M), report.data
    [ev] = gw.events("dsn")
    assert (ev["original"], ev["action"], ev["to"]) == (qid, action, SENDER)


@pytest.mark.parametrize("mode", ["queue", "proxy"])
def test_maildir_delivery_reports_delivered(gateway_factory, mode):
    gw = gateway_factory(policy("maildir:Maildir", mode))
    qid = send(gw)
    gw.wait_for(lambda e: len(gw.maildir_messages()) >= 2, 15)
    original, report = sorted(gw.maildir_messages(), key=lambda m: b"Return-Path: <>" in m)
    assert original.startswith(b"Return-Path: <bob@sender.test>\r\n"
                               b"Delivered-To: alice@example.test\r\n")
    assert report.startswith(b"Return-Path: <>\r\nDelivered-To: bob@sender.test\r\n")
    check_report(report.split(b"\r\n", 2)[2], "delivered")
    assert b"Remote-MTA:" not in report and b"Diagnostic-Code:" not in report  # no server
    assert gw.events("dsn")[0]["original"] == qid


@pytest.mark.parametrize("mode", ["queue", "proxy"])
def test_no_report_from_us_when_the_downstream_offers_dsn(gateway_factory, mode):
    with Sink(ehlo_extensions=(*DEFAULT_EXTENSIONS, "DSN")) as sink:
        gw = gateway_factory(policy(f"smtp://127.0.0.1:{sink.port}", mode))
        qid = send(gw)
        [msg] = sink.wait_for(1, 15)
        delivered(gw, qid, mode)
        time.sleep(0.5)  # a report would be queued before the delivery ends; give it a scan
        assert len(sink.messages) == 1
    assert set(msg.rcpt_params[0]) == {"NOTIFY=FAILURE,SUCCESS",
                                       "ORCPT=rfc822;alice+2Bq@example.test"}
    assert set(msg.mail_params) >= {"RET=HDRS", "ENVID=figures+2B1"}
    assert gw.events("dsn") == []


@pytest.mark.parametrize("mode", ["queue", "proxy"])
@pytest.mark.parametrize("mail, rcpt", [
    (ORCPT_MAIL, "RCPT TO:<alice@example.test> NOTIFY=FAILURE,DELAY"),
    (ORCPT_MAIL, "RCPT TO:<alice@example.test>"),
    ("MAIL FROM:<>", ORCPT_RCPT),  # never to the null sender
])
def test_no_success_report_without_notify_success(gateway_factory, mode, mail, rcpt):
    with Sink() as sink:
        gw = gateway_factory(policy(f"smtp://127.0.0.1:{sink.port}", mode))
        qid = send(gw, mail, rcpt)
        sink.wait_for(1, 15)
        delivered(gw, qid, mode)
        time.sleep(0.5)
        assert len(sink.messages) == 1
    assert gw.events("dsn") == []


@pytest.mark.postfix
@pytest.mark.skipif(not postfix_available(),
                    reason=f"private Postfix unavailable: {postfix_unavailable_reason()}")
@pytest.mark.parametrize("mode", ["queue", "proxy"])
def test_a_real_postfix_gets_the_dsn_parameters_and_reports_success_itself(
        gateway_factory, tmp_path, mode):
    """Postfix offers DSN: it gets NOTIFY/ORCPT/RET/ENVID, so the success report is its own
    (delivered to its Maildir, as sender.test is one of its domains), carrying our client's
    ENVID and ORCPT decoded; none comes from us, and NOTIFY=NEVER gets none at all."""
    with PostfixInstance(tmp_path / "postfix", domains=("example.test", "sender.test")) as pf:
        gw = gateway_factory(policy(f"smtp://127.0.0.1:{pf.port}", mode))
        with RawSmtpClient(gw.address) as c:
            c.cmd("EHLO client.test")
            assert c.cmd(ORCPT_MAIL).startswith("250 ")
            assert c.cmd(ORCPT_RCPT).startswith("250 ")
            assert c.cmd("RCPT TO:<carol@example.test> NOTIFY=NEVER").startswith("250 ")
            assert c.cmd("DATA").startswith("354")
            c.send(BODY)
            assert c.reply().startswith("250 ")
        msgs = pf.wait_for_messages(3, 20)  # alice's and carol's copies, Postfix's report
        pf.wait_for_log("sender delivery status notification")
        time.sleep(0.5)  # a report of ours would be queued before the delivery ends
        msgs = pf.messages()
    reports = [m for m in msgs if m.startswith(b"Return-Path: <>")]
    assert len(msgs) == 3 and len(reports) == 1, msgs
    report = reports[0]
    assert b"From: Mail Delivery System <MAILER-DAEMON@downstream.mailgate.test>" in report
    part = report.split(b"message/delivery-status", 1)[1]
    for line in (rb"Original-Envelope-Id: figures\+1", rb"Final-Recipient: rfc822; alice@example.test",
                 rb"Original-Recipient: rfc822; ?alice\+q@example.test", rb"Action: delivered"):
        assert re.search(rb"^" + line + rb"\r?$", part, re.M), (line, part)
    assert b"carol@example.test" not in part  # NOTIFY=NEVER
    assert gw.events("dsn") == []
