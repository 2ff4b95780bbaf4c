"""RFC 3461 DSN parameters: advertised, validated, carried through both relay modes to a
downstream that offers DSN, and dropped for one that does not."""

from __future__ import annotations

import pytest

from tests.support.gateway import base_policy
from tests.support.sink import DEFAULT_EXTENSIONS, Sink
from tests.support.smtpclient import RawSmtpClient

BODY = b"From: a@sender.test\r\nSubject: dsn\r\n\r\nbody\r\n.\r\n"


def send(gw, mail: str, rcpt: str) -> list[str]:
    with RawSmtpClient(gw.address) as c:
        ehlo = c.cmd("EHLO client.test")
        out = [ehlo, c.cmd(mail), c.cmd(rcpt), c.cmd("DATA")]
        c.send(BODY)
        out.append(c.reply())
        c.cmd("QUIT")
    return out


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_dsn_parameters_reach_a_dsn_capable_downstream(gateway_factory, mode):
    with Sink(ehlo_extensions=(*DEFAULT_EXTENSIONS, "DSN")) as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": mode},
                                         queue={"scan_interval_s": 0.2}))
        ehlo, mail, rcpt, data, end = send(
            gw, "MAIL FROM:<a@sender.test> RET=HDRS ENVID=QQ+2B1",
            "RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice+2Bx@example.test")
        assert "250-DSN" in ehlo or ehlo.endswith("250 DSN")
        assert mail.startswith("250 ") and rcpt.startswith("250 ") and end.startswith("250 ")
        [msg] = sink.wait_for(1, 10)
    assert set(msg.mail_params) >= {"RET=HDRS", "ENVID=QQ+2B1"}
    assert set(msg.rcpt_params[0]) == {"NOTIFY=FAILURE,SUCCESS",
                                       "ORCPT=rfc822;alice+2Bx@example.test"}


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_utf8_orcpt_is_accepted_and_passed_on_as_utf8_addr_xtext(gateway_factory, mode):
    """RFC 6533: in an SMTPUTF8 transaction ORCPT=utf-8;<unitext> is valid (it was refused
    501, a permanent failure for the recipient); the downstream gets the utf-8-addr-xtext form,
    valid whether or not it offers SMTPUTF8 (xtext's +C3+A9 is not that form)."""
    with Sink(ehlo_extensions=(*DEFAULT_EXTENSIONS, "DSN")) as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": mode},
                                         queue={"scan_interval_s": 0.2}))
        with RawSmtpClient(gw.address) as c:
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8").startswith("250 ")
            for rcpt in ("RCPT TO:<pel\u00e9@example.test> NOTIFY=SUCCESS "
                         "ORCPT=utf-8;pel\u00e9@example.test",
                         "RCPT TO:<zoe@example.test> ORCPT=utf-8;zo+C3+AB@example.test"):
                assert c.cmd(rcpt).startswith("250 "), rcpt
            assert c.cmd("DATA").startswith("354")
            c.send(BODY)
            assert c.reply().startswith("250 ")
        [msg] = sink.wait_for(1, 10)
    assert msg.rcpt_params == (("NOTIFY=SUCCESS", "ORCPT=utf-8;pel\\x{E9}@example.test"),
                               ("ORCPT=utf-8;zo\\x{EB}@example.test",))


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_dsn_parameters_are_not_sent_to_a_downstream_without_dsn(gateway_factory, mode):
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": mode},
                                         queue={"scan_interval_s": 0.2}))
        *_, end = send(gw, "MAIL FROM:<a@sender.test> RET=FULL ENVID=abc",
                       "RCPT TO:<alice@example.test> NOTIFY=NEVER")
        assert end.startswith("250 ")
        [msg] = sink.wait_for(1, 10)
    assert not any(p.startswith(("RET=", "ENVID=")) for p in msg.mail_params)
    assert msg.rcpt_params[0] == ()


@pytest.mark.parametrize("rcpt, expected", [
    ("RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter"),
    ("RCPT TO:<alice@example.test> NOTIFY=SOMETIMES", "501 5.5.4 Bad NOTIFY parameter"),
    ("RCPT TO:<alice@example.test> ORCPT=alice@example.test", "501 5.5.4 Bad ORCPT parameter"),
    ("RCPT TO:<alice@example.test> ORCPT=rfc822;a+ZZ", "501 5.5.4 Bad ORCPT parameter"),
])
def test_bad_dsn_parameters_are_refused(gateway_factory, rcpt, expected):
    gw = gateway_factory(base_policy())
    with RawSmtpClient(gw.address) as c:
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250 ")
        assert c.cmd(rcpt) == expected
        assert c.cmd("RCPT TO:<alice@example.test>").startswith("250 ")


@pytest.mark.parametrize("mail, rcpt, expected", [
    ("MAIL FROM:<a@sender.test>", "RCPT TO:<alice@example.test> ORCPT=rfc822;+20",
     "501 5.5.4 Bad ORCPT parameter"),
    ("MAIL FROM:<a@sender.test>", "RCPT TO:<alice@example.test> ORCPT=rfc822;a+0Ab",
     "501 5.5.4 Bad ORCPT parameter"),
])
def test_dsn_values_a_dsn_could_not_carry_are_refused(gateway_factory, mail, rcpt, expected):
    gw = gateway_factory(base_policy())
    with RawSmtpClient(gw.address) as c:
        c.cmd("EHLO client.test")
        assert c.cmd(mail).startswith("250 ")
        assert c.cmd(rcpt) == expected


def test_envid_with_a_line_separator_is_refused(gateway_factory):
    gw = gateway_factory(base_policy())
    with RawSmtpClient(gw.address) as c:
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test> ENVID=+E2+80+A8") == "501 5.5.4 Bad ENVID parameter"
