"""Policy classes: per-recipient-domain scores, thresholds, rules and filter skips. One
transaction has one class (the first accepted recipient's); a recipient of another class gets
``452 4.5.3`` and is sent again in its own transaction, where it gets its own class's answer."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.support.gateway import base_policy

QID_RE = re.compile(r"\(([0-9A-Z]{16})\)$")

# RFC 5322 requires Date and From; this one has From but neither Date nor Message-ID
# (HEADERS_MISSING_DATE 1.0 + HEADERS_MISSING_MESSAGE_ID 0.5 = 1.5).
SLOPPY = b"From: bob@sender.test\r\nSubject: sloppy\r\n\r\nsloppy body\r\n"
TIDY = (b"From: bob@sender.test\r\nDate: Mon, 2 Mar 2026 10:00:00 +0000\r\n"
        b"Message-ID: <tidy@sender.test>\r\nSubject: tidy\r\n\r\ntidy body\r\n")


def classes_policy() -> dict:
    return base_policy(
        domains={"accepted": ["example.test", "strict.test", "lax.test", "lax2.test",
                              "frozen.test"]},
        filters=[{"name": "rcpt", "recipients": ["@example.test", "@strict.test",
                                                 "known@lax.test", "known@lax2.test",
                                                 "@frozen.test"]},
                 {"name": "headers", "on_error": "continue"}],
        scores={"HEADERS_MISSING_DATE": 1.0, "HEADERS_MISSING_MESSAGE_ID": 0.5},
        classes={
            "strict": {"domains": ["strict.test"], "actions": {"reject": 1.0}},
            # lax and lax2 are the same but for skip_filters (lax2 is the control)
            "lax": {"domains": ["lax.test"], "actions": {"reject": 1.0},
                    "skip_filters": ["rcpt", "headers"]},
            "lax2": {"domains": ["lax2.test"], "actions": {"reject": 1.0}},
            "frozen": {"domains": ["frozen.test"],
                       "rules": [{"name": "frozen", "if_any": ["RCPT_KNOWN"], "stage": "rcpt",
                                  "action": "tempfail"}]},
        },
    )


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(classes_policy())


def transaction(s: smtplib.SMTP, rcpts: list[str], body: bytes
                ) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
    """MAIL, each RCPT, DATA if any recipient was accepted. Returns the RCPT replies and the
    DATA reply (None if no DATA was sent, in which case the transaction is RSET)."""
    assert s.mail("bob@sender.test")[0] == 250
    replies = [(c, t.decode()) for c, t in (s.rcpt(r) for r in rcpts)]
    if not any(c == 250 for c, _ in replies):
        s.rset()
        return replies, None
    code, text = s.data(body)
    return replies, (code, text.decode())


def qid_of(text: str) -> str:
    m = QID_RE.search(text) or re.search(r"queued as ([0-9A-Z]{16})$", text)
    assert m, text
    return m.group(1)


def test_threshold_per_class(gw):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        _, (code, text) = transaction(s, ["alice@example.test"], SLOPPY)
        assert code == 250, text
        ok_qid = qid_of(text)
        _, (code, text) = transaction(s, ["bob@strict.test"], SLOPPY)
        assert code == 550 and text.startswith("5.7.1 Message rejected by policy (")
        strict_qid = qid_of(text)
        _, (code, text) = transaction(s, ["bob@strict.test"], TIDY)  # control: a tidy message
        assert code == 250, text
        tidy_qid = qid_of(text)

    ev = gw.message_event(ok_qid)
    assert (ev["policy_class"], ev["action"], ev["score"]) == ("default", "accept", 1.5)
    ev = gw.message_event(strict_qid)
    assert (ev["policy_class"], ev["action"], ev["by"]) == ("strict", "reject",
                                                            "threshold:reject>=1")
    assert ev["score"] == 1.5 and ev["relay"] == "not relayed"
    assert sorted(ev["symbols"]) == ["HEADERS_MISSING_DATE(1)",
                                     "HEADERS_MISSING_MESSAGE_ID(0.5)", "RCPT_KNOWN(0)"]
    ev = gw.message_event(tidy_qid)
    assert (ev["policy_class"], ev["action"], ev["score"]) == ("strict", "accept", 0)

    # Maildir file names do not order two deliveries of the same second: sort by recipient
    delivered = sorted(gw.maildir_messages(), key=lambda m: m.split(b"\r\n")[1])
    assert [m.split(b"\r\n")[1] for m in delivered] == [b"Delivered-To: alice@example.test",
                                                        b"Delivered-To: bob@strict.test"]
    assert delivered[1].endswith(b"tidy body\r\n")


@pytest.mark.parametrize("first,second", [("alice@example.test", "bob@strict.test"),
                                          ("bob@strict.test", "alice@example.test")])
def test_mixed_classes_split_into_two_transactions(gw, first, second):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        rcpt_replies, data_reply = transaction(s, [first, second], SLOPPY)
        assert rcpt_replies[0][0] == 250
        code, text = rcpt_replies[1]
        assert code == 452 and text.startswith("4.5.3 Recipient needs a separate transaction "
                                               "(different policy), send it again (")
        # The client sends the deferred recipient again, in a new transaction.
        rcpt_replies2, data_reply2 = transaction(s, [second], SLOPPY)
        assert rcpt_replies2 == [(250, "2.1.5 Recipient ok")]

    by_rcpt = {first: data_reply, second: data_reply2}
    # Each recipient got its own class's answer for the same message.
    code, text = by_rcpt["alice@example.test"]
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    code, text = by_rcpt["bob@strict.test"]
    assert code == 550 and text.startswith("5.7.1 Message rejected by policy (")

    first_ev = gw.message_event(qid_of(data_reply[1]))
    assert first_ev["rcpts"] == [first] and first_ev["rcpt_refused"] == 1
    second_ev = gw.message_event(qid_of(data_reply2[1]))
    assert second_ev["rcpts"] == [second] and second_ev["rcpt_refused"] == 0
    assert {first_ev["policy_class"], second_ev["policy_class"]} == {"default", "strict"}
    # Only alice's copy was delivered; strict.test's was refused in the session.
    [msg] = gw.maildir_messages()
    assert msg.split(b"\r\n")[1] == b"Delivered-To: alice@example.test"
    assert msg.endswith(b"sloppy body\r\n")


def test_same_class_recipients_share_a_transaction(gw):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        rcpts, (code, text) = transaction(s, ["a@strict.test", "b@strict.test"], TIDY)
    assert [c for c, _ in rcpts] == [250, 250] and code == 250, text
    assert sorted(m.split(b"\r\n")[1] for m in gw.maildir_messages()) == [
        b"Delivered-To: a@strict.test", b"Delivered-To: b@strict.test"]


def test_skip_filters(gw):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        # Control class lax2 (no skips): rcpt knows only known@lax2.test, headers score 1.5.
        rcpts, _ = transaction(s, ["stranger@lax2.test"], SLOPPY)
        assert rcpts[0][0] == 550 and rcpts[0][1].startswith(
            "5.1.1 <stranger@lax2.test>: Recipient address rejected: User unknown")
        _, (code, text) = transaction(s, ["known@lax2.test"], SLOPPY)
        assert code == 550 and text.startswith("5.7.1 Message rejected by policy (")
        # lax skips both filters: the unknown user is accepted and the score stays 0.
        rcpts, (code, text) = transaction(s, ["stranger@lax.test"], SLOPPY)
        assert rcpts == [(250, "2.1.5 Recipient ok")]
        assert code == 250, text
        lax_qid = qid_of(text)
    ev = gw.message_event(lax_qid)
    assert ev["policy_class"] == "lax" and ev["action"] == "accept"
    assert ev["symbols"] == [] and ev["score"] == 0
    assert set(ev["stage_ms"]) <= {"connect", "helo", "mail"}  # no rcpt/message filter ran
    [msg] = gw.maildir_messages()
    assert msg.split(b"\r\n")[1] == b"Delivered-To: stranger@lax.test"
    assert b"X-Spam-Score: 0\r\n" in msg


def test_rcpt_stage_tempfail_rule(gw):
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("bob@sender.test")[0] == 250
        code, text = s.rcpt("anyone@frozen.test")
        text = text.decode()
        assert code == 451 and text.startswith(
            "4.7.1 Message deferred by policy, try again later (")
        qid = qid_of(text)
        # The refusal is per recipient: the transaction goes on for other recipients.
        assert s.rcpt("alice@example.test")[0] == 250
        code, _ = s.data(TIDY)
        assert code == 250
    ev = gw.message_event(qid)
    assert ev["rcpts"] == ["alice@example.test"] and ev["rcpt_refused"] == 1
    assert ev["policy_class"] == "default"  # the refused recipient never set the class
    [msg] = gw.maildir_messages()
    assert msg.split(b"\r\n")[1] == b"Delivered-To: alice@example.test"
