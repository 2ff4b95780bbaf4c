"""Proxy-mode relay end to end: the real gateway process in front of the scriptable sink
(tests/support/sink.py). The client gets 250 only after the downstream said 250; downstream
refusals come back to the client per recipient (RCPT) or after the final dot (DATA); a
downstream that is down, slow or drops the connection gives 451 4.4.x and nothing is acked.
"""

from __future__ import annotations

import email
import json
import smtplib
import socket
import time
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

SENDER = "bob@sender.test"
ALICE = "alice@example.test"
CAROL = "carol@example.test"

MESSAGE = (b"From: Bob <bob@sender.test>\r\n"
           b"To: Alice <alice@example.test>\r\n"
           b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
           b"Message-ID: <proxy-test@sender.test>\r\n"
           b"Subject: proxy relay\r\n"
           b"\r\n"
           b"first line\r\n"
           b".a line that starts with a dot\r\n"
           b"..two dots\r\n"
           b".\tdot tab\r\n"
           b"\r\n"
           b"last line\r\n")
NO_DATE = MESSAGE.replace(b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n", b"")


def smtp_policy(sink: Sink, scheme: str = "smtp", **sections: Any) -> dict[str, Any]:
    return base_policy(downstream=f"{scheme}://127.0.0.1:{sink.port}", **sections)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Result:
    def __init__(self) -> None:
        self.mail: tuple[int, bytes] = (0, b"")
        self.rcpts: list[tuple[int, bytes]] = []
        self.data: tuple[int, bytes] | None = None
        self.data_s = 0.0  # time from DATA to the final reply

    @property
    def qid(self) -> str:
        assert self.data is not None and self.data[0] == 250, self.data
        return self.data[1].decode().rsplit(" ", 1)[1]

    def data_text(self) -> str:
        assert self.data is not None
        return self.data[1].decode()


def transact(gw: GatewayProcess, rcpts: list[str], message: bytes = MESSAGE,
             sender: str = SENDER) -> Result:
    """One transaction with smtplib: MAIL, each RCPT, DATA if any RCPT was accepted."""
    res = Result()
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("client.test")
        res.mail = s.mail(sender)
        assert res.mail[0] == 250, res.mail
        res.rcpts = [s.rcpt(r) for r in rcpts]
        if any(code == 250 for code, _ in res.rcpts):
            t0 = time.monotonic()
            res.data = s.data(message)
            res.data_s = time.monotonic() - t0
    return res


def headers_before(data: bytes, original: bytes) -> list[tuple[str, str]]:
    """The header fields the gateway prepended to ``original`` (which ``data`` must end with)."""
    assert data.endswith(original), data[:400]
    prefix = data[: len(data) - len(original)]
    return list(email.message_from_bytes(prefix + b"\r\n").items())


# -- the happy path ----------------------------------------------------------------------------

def test_message_arrives_intact_with_envelope_and_trace_headers(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(smtp_policy(sink))
        res = transact(gw, [ALICE, CAROL])
        assert [c for c, _ in res.rcpts] == [250, 250]
        assert res.data is not None and res.data[0] == 250
        assert res.data_text().startswith("2.0.0 Ok: queued as ")
        qid = res.qid
        [msg] = sink.wait_for(1)
    assert msg.mail_from == SENDER
    assert msg.rcpts == (ALICE, CAROL)
    assert msg.helo == "mx.gateway.test"
    # dot-stuffed on the wire, restored exactly by the unstuffing
    assert b"\r\n..a line that starts with a dot\r\n...two dots\r\n..\tdot tab\r\n" in msg.raw
    added = headers_before(msg.data, MESSAGE)
    assert added[0][0] == "Received"
    received = " ".join(added[0][1].split())
    assert received.startswith("from client.test ([127.0.0.1]) by mx.gateway.test (mailgate) "
                               f"with ESMTP id {qid}")
    names = [n for n, _ in added]
    assert "X-Spam-Status" in names and "X-Spam-Score" in names
    status = dict(added)["X-Spam-Status"]
    assert status.startswith("No, score=0 ") and "action=accept" in status
    ev = gw.message_event(qid)
    assert ev["action"] == "accept"
    assert ev["rcpts"] == [ALICE, CAROL]
    assert ev["relay"].startswith("250 2.0.0 Ok: queued as 1")
    assert ev["reply"] == f"250 2.0.0 Ok: queued as {qid}"


def test_trace_and_spam_headers_can_be_turned_off(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(smtp_policy(sink, headers={"received": False,
                                                        "spam_headers": False}))
        res = transact(gw, [ALICE])
        assert res.data is not None and res.data[0] == 250
        [msg] = sink.wait_for(1)
    assert msg.data == MESSAGE  # byte for byte what the client sent
    assert gw.message_event(res.qid)["action"] == "accept"


def test_250_only_after_the_downstream_accepted(gateway_factory):
    with Sink(delay_s=1.0, delay_on={"DATA_END"}) as sink:
        gw = gateway_factory(smtp_policy(sink))
        res = transact(gw, [ALICE])
        # checked at once, no waiting: the message is downstream when the client has its 250
        got = sink.messages
    assert res.data is not None and res.data[0] == 250
    assert res.data_s >= 1.0, f"250 came {res.data_s:.3f}s after DATA, before the downstream"
    assert len(got) == 1 and got[0].rcpts == (ALICE,)


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_and_the_first_rcpt_go_downstream_in_one_group_when_pipelining(gateway_factory,
                                                                            pipelining):
    # with PIPELINING the sink holds its MAIL reply until a RCPT arrives: only a relay that
    # sends the first RCPT with MAIL gets through; without it, one command at a time
    ext = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES") if pipelining else ("8BITMIME",)
    bad = "bad@example.test"
    with Sink(hold_until="RCPT" if pipelining else None, ehlo_extensions=ext,
              replies={f"RCPT:{bad}": "550 5.1.1 no such user"}) as sink:
        gw = gateway_factory(smtp_policy(sink))
        for first, then in ((ALICE, CAROL), (bad, ALICE)):  # the 2nd on the reused connection
            res = transact(gw, [first, then])
            assert [c for c, _ in res.rcpts] == [250 if first == ALICE else 550, 250]
            assert res.data is not None and res.data[0] == 250
        msgs = sink.wait_for(2)
    assert [m.rcpts for m in msgs] == [(ALICE, CAROL), (ALICE,)]
    assert sink.connections == 1


# -- per-recipient answers ---------------------------------------------------------------------

def test_downstream_rcpt_refusals_are_passed_back_per_recipient(gateway_factory):
    bad, busy = "bad@example.test", "busy@example.test"
    with Sink(replies={f"RCPT:{bad}": "550 5.1.1 no such user",
                       f"RCPT:{busy}": "450 4.2.1 mailbox busy"}) as sink:
        gw = gateway_factory(smtp_policy(sink))
        res = transact(gw, [bad, ALICE, busy])
        assert res.data is not None and res.data[0] == 250
        [msg] = sink.wait_for(1)
    (c_bad, t_bad), (c_ok, _), (c_busy, t_busy) = res.rcpts
    assert (c_bad, c_ok, c_busy) == (550, 250, 450)
    assert t_bad.startswith(b"5.1.1 no such user")
    assert t_busy.startswith(b"4.2.1 mailbox busy")
    assert t_busy.endswith(f"({res.qid})".encode())
    assert msg.rcpts == (ALICE,)
    ev = gw.message_event(res.qid)
    assert ev["rcpts"] == [ALICE] and ev["rcpt_refused"] == 2


def test_451_at_rcpt_is_passed_back_and_nothing_is_sent(gateway_factory):
    with Sink(replies={"RCPT": "451 4.3.0 try later"}) as sink:
        gw = gateway_factory(smtp_policy(sink))
        res = transact(gw, [ALICE])
        assert res.rcpts[0][0] == 451
        assert res.rcpts[0][1].startswith(b"4.3.0 try later")
        assert res.data is None
        time.sleep(0.2)
        assert sink.messages == []
        assert "DATA" not in sink.commands


# -- downstream unavailable --------------------------------------------------------------------

def test_downstream_refusing_connections_gives_451_441_at_rcpt(gateway_factory):
    gw = gateway_factory(base_policy(downstream=f"smtp://127.0.0.1:{free_port()}"))
    res = transact(gw, [ALICE])
    code, text = res.rcpts[0]
    assert code == 451 and text.startswith(b"4.4.1 ")
    assert b"refused" not in text.lower()  # connection details stay in the log
    assert res.data is None
    ev = gw.message_event()
    assert ev["action"] == "tempfail" and ev["rcpts"] == [] and ev["rcpt_refused"] == 1
    assert ev["reply"].startswith("451 4.4.1 ") and ev["by"] == "downstream"
    assert ev["relay"].startswith("connect failed")


def test_downstream_greeting_421_gives_451_at_rcpt(gateway_factory):
    with Sink(greeting="421 4.3.2 too busy") as sink:
        gw = gateway_factory(smtp_policy(sink))
        res = transact(gw, [ALICE])
        code, text = res.rcpts[0]
        assert code == 451 and text[:4] == b"4.4."
        assert res.data is None
        assert sink.messages == [] and sink.connections == 1


# -- refusals and failures after DATA ----------------------------------------------------------

def _refused_after_data(gateway_factory, sink: Sink, expect_code: int, expect_text: bytes
                        ) -> tuple[GatewayProcess, Result]:
    gw = gateway_factory(smtp_policy(sink))
    res = transact(gw, [ALICE])
    assert res.data is not None
    code, text = res.data
    ev = gw.message_event()
    assert code == expect_code, res.data
    assert text.startswith(expect_text), text
    assert text.endswith(f"({ev['qid']})".encode()), text
    assert ev["reply"].startswith(str(expect_code))
    return gw, res


def test_data_command_refused_451_is_passed_back_after_the_dot(gateway_factory):
    with Sink(replies={"DATA": "451 4.3.0 later"}) as sink:
        _refused_after_data(gateway_factory, sink, 451, b"4.3.0 later")
        assert sink.messages == []


def test_data_command_refused_554_is_passed_back_after_the_dot(gateway_factory):
    with Sink(replies={"DATA": "554 5.7.1 no"}) as sink:
        _refused_after_data(gateway_factory, sink, 554, b"5.7.1 no")
        assert sink.messages == []


def test_end_of_data_554_is_passed_back(gateway_factory):
    with Sink(replies={"DATA_END": "554 5.6.0 content refused"}) as sink:
        gw, _ = _refused_after_data(gateway_factory, sink, 554, b"5.6.0 content refused")
    ev = gw.message_event()
    assert ev["relay"].startswith("554 5.6.0 content refused")


def test_connection_dropped_after_data_gives_451_442(gateway_factory):
    with Sink(drop_after_data=True) as sink:
        gw, _ = _refused_after_data(gateway_factory, sink, 451, b"4.4.2 ")
        assert len(sink.messages) == 1  # the downstream had it, but never said 250
    assert gw.message_event()["relay"].startswith("DATA failed")


def test_slow_end_of_data_reply_times_out_with_451_442(gateway_factory):
    with Sink(delay_s=5.0, delay_on={"DATA_END"}) as sink:
        gw = gateway_factory(smtp_policy(sink, relay={"command_timeout_s": 1,
                                                      "data_timeout_s": 1}))
        res = transact(gw, [ALICE])
    assert res.data is not None
    code, text = res.data
    assert (code, text[:6]) == (451, b"4.4.2 "), res.data
    assert 0.9 <= res.data_s < 4.0
    assert "timed out" in gw.message_event()["relay"]


def test_slow_rcpt_reply_times_out_with_451_442(gateway_factory):
    with Sink(delay_s=5.0, delay_on={"RCPT"}) as sink:
        gw = gateway_factory(smtp_policy(sink, relay={"command_timeout_s": 1,
                                                      "data_timeout_s": 1}))
        t0 = time.monotonic()
        res = transact(gw, [ALICE])
        elapsed = time.monotonic() - t0
        code, text = res.rcpts[0]
        assert (code, text[:6]) == (451, b"4.4.2 "), res.rcpts
        assert elapsed < 4.0
        assert res.data is None and sink.messages == []


# -- LMTP downstream ---------------------------------------------------------------------------

def test_lmtp_two_recipients_both_delivered(gateway_factory):
    with Sink(lmtp=True) as sink:
        gw = gateway_factory(smtp_policy(sink, "lmtp"))
        res = transact(gw, [ALICE, CAROL])
        assert res.data is not None and res.data[0] == 250
        [msg] = sink.wait_for(1)
    assert msg.rcpts == (ALICE, CAROL) and len(msg.replies) == 2
    assert "LHLO mx.gateway.test" in sink.commands
    ev = gw.message_event(res.qid)
    assert ev["action"] == "accept" and ev["relay"].count("250 2.1.5") == 2


def test_lmtp_one_recipient_failing_at_end_of_data_gives_4xx(gateway_factory):
    with Sink(lmtp=True, replies={f"DATA_END:{CAROL}": "552 5.2.2 mailbox full"}) as sink:
        gw = gateway_factory(smtp_policy(sink, "lmtp"))
        res = transact(gw, [ALICE, CAROL])
        [msg] = sink.wait_for(1)
    assert res.data is not None
    code, text = res.data
    # One SMTP reply cannot say "delivered to alice, not to carol": a 250 would lose carol's
    # copy, so the client is told to retry (alice gets a duplicate).
    assert code == 451 and text.startswith(b"4.3.0 "), res.data
    ev = gw.message_event()
    assert text.endswith(f"({ev['qid']})".encode())
    assert ev["reply"].startswith("451 4.3.0")
    assert "250 2.1.5" in ev["relay"] and "552 5.2.2 mailbox full" in ev["relay"]
    assert msg.replies[1] == "552 5.2.2 mailbox full"


def test_lmtp_all_recipients_failing_permanently_gives_5xx(gateway_factory):
    with Sink(lmtp=True, replies={"DATA_END": "550 5.1.1 gone"}) as sink:
        gw = gateway_factory(smtp_policy(sink, "lmtp"))
        res = transact(gw, [ALICE, CAROL])
    assert res.data is not None and res.data[0] == 550
    assert res.data[1].startswith(b"5.1.1 gone")
    assert gw.message_event()["action"] == "accept"


# -- maildir transport -------------------------------------------------------------------------

def test_maildir_one_file_per_recipient_before_the_250(gateway_factory):
    gw = gateway_factory(base_policy())
    res = transact(gw, [ALICE, CAROL])
    assert res.data is not None and res.data[0] == 250
    files = gw.maildir_messages()  # no waiting: the files exist when the 250 is seen
    assert len(files) == 2
    delivered = sorted(f.split(b"\r\n", 2)[1] for f in files)
    assert delivered == [b"Delivered-To: " + ALICE.encode(), b"Delivered-To: " + CAROL.encode()]
    for f in files:
        assert f.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
        assert f"id {res.qid}".encode() in f
        assert f.endswith(MESSAGE)  # maildir keeps the body as sent (no dot-stuffing)
    assert not any((gw.workdir / "Maildir" / "tmp").iterdir())
    assert gw.message_event(res.qid)["relay"].endswith("2 delivered")


# -- the policy refuses or quarantines at end of data ------------------------------------------

def test_policy_reject_at_end_of_data_aborts_the_downstream(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(smtp_policy(sink, scores={"HEADERS_MISSING_DATE": 1.0},
                                         actions={"reject": 0.1}))
        res = transact(gw, [ALICE], NO_DATE)
        assert res.data is not None
        code, text = res.data
        ev = gw.message_event()
        assert code == 550 and text.startswith(b"5.7.1 "), res.data
        assert text.endswith(f"({ev['qid']})".encode())
        assert ev["action"] == "reject" and ev["relay"] == "not relayed"
        assert any(s.startswith("HEADERS_MISSING_DATE") for s in ev["symbols"])
        time.sleep(0.2)
        assert sink.messages == []
        assert "DATA" not in sink.commands and f"RCPT TO:<{ALICE}>" in sink.commands


def test_policy_quarantine_keeps_the_message_and_relays_nothing(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(smtp_policy(sink, scores={"HEADERS_MISSING_DATE": 1.0},
                                         actions={"quarantine": 0.1, "reject": False}))
        res = transact(gw, [ALICE], NO_DATE)
        assert res.data is not None and res.data[0] == 250
        qid = res.qid
        time.sleep(0.2)
        assert sink.messages == [] and "DATA" not in sink.commands
    ev = gw.message_event(qid)
    assert ev["action"] == "quarantine" and ev["relay"] == "quarantined"
    spool = gw.workdir / "spool"  # in the spool's hold/ area (gateway/quarantine.py)
    assert (spool / "data" / qid).read_bytes().endswith(NO_DATE)
    record = json.loads((spool / "hold" / f"{qid}.json").read_text())
    assert record["qid"] == qid and record["sender"] == SENDER
    assert [r["addr"] for r in record["recipients"]] == [ALICE]
    assert "HEADERS_MISSING_DATE" in record["decision"]["symbols"]
