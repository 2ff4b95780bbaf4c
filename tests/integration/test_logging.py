"""The structured log lines: one ``message`` event per transaction and one ``connection`` event
per connection, as JSON lines (``--log-format json``) and as readable ``key=value`` lines
(``--log-format kv``); the qid ties the 250 reply, the log line and the Received header together.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy, parse_kv_line
from tests.support.smtpclient import RawSmtpClient

SENDER = "bob@sender.test"
ALICE = "alice@example.test"
CAROL = "carol@example.test"
BODY = (b"From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: log me\r\n"
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <log@sender.test>\r\n\r\nhello\r\n")
NO_FROM = (b"To: alice@example.test\r\nSubject: anonymous\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <nf@sender.test>\r\n\r\nhi\r\n")
QID = r"([0-9A-Z]{16})"
MESSAGE_FIELDS = {"qid", "client", "helo", "sender", "rcpts", "size", "score", "action",
                  "symbols", "stage_ms", "relay", "reply"}
CONNECTION_FIELDS = {"sid", "client", "transactions", "accepted", "refused", "end"}


def connect(gw: GatewayProcess) -> RawSmtpClient:
    c = RawSmtpClient(gw.address)
    assert c.greeting.startswith("220 ")
    return c


def qid_of(reply: str) -> str:
    m = re.search(rf"(?:queued as |\(){QID}\)?$", reply)
    assert m, reply
    return m.group(1)


def logging_policy() -> dict[str, Any]:
    p = base_policy(rules=[{"name": "no-from", "if_any": ["HEADERS_MISSING_FROM"],
                            "action": "reject", "reply": "550 5.7.1 A From header is required"}])
    p["filters"][0] = {"name": "rcpt", "recipients": [ALICE, CAROL]}
    return p


def session(gw: GatewayProcess, sender: str = SENDER) -> dict[str, str]:
    """One connection with four transactions; returns the qid of each by name."""
    c = connect(gw)
    qids: dict[str, str] = {}
    assert c.cmd("EHLO client.test").split("\n")[-1].startswith("250 ")
    # 1. accepted, two recipients
    assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender ok"
    assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
    assert c.cmd(f"RCPT TO:<{CAROL}>") == "250 2.1.5 Recipient ok"
    assert c.cmd("DATA").startswith("354 ")
    final = c.cmd(BODY + b".")
    assert re.fullmatch(rf"250 2\.0\.0 Ok: queued as {QID}", final), final
    qids["accepted"] = qid_of(final)
    # 2. unknown user: the only recipient refused, the client gives up with RSET
    assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender ok"
    reply = c.cmd("RCPT TO:<nobody@example.test>")
    assert re.fullmatch(rf"550 5\.1\.1 <nobody@example\.test>: Recipient address rejected: "
                        rf"User unknown \({QID}\)", reply), reply
    qids["unknown"] = qid_of(reply)
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    # 3. policy reject at end of data (a rule)
    assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender ok"
    assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
    assert c.cmd("DATA").startswith("354 ")
    reply = c.cmd(NO_FROM + b".")
    assert re.fullmatch(rf"550 5\.7\.1 A From header is required \({QID}\)", reply), reply
    qids["policy"] = qid_of(reply)
    # 4. relay denied, then the client quits in the middle of the transaction
    assert c.cmd(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender ok"
    reply = c.cmd("RCPT TO:<someone@elsewhere.test>")
    assert re.fullmatch(rf"550 5\.7\.1 Relay access denied \({QID}\)", reply), reply
    qids["relay"] = qid_of(reply)
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    return qids


def check_session_events(gw: GatewayProcess, qids: dict[str, str], sender: str
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Shared assertions for both formats (kv values are strings, so compare as text)."""
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    messages = gw.events("message")
    assert sorted(e["qid"] for e in messages) == sorted(qids.values())  # one line each
    assert len(set(qids.values())) == 4
    by = {name: next(e for e in messages if e["qid"] == q) for name, q in qids.items()}
    for e in messages:
        assert MESSAGE_FIELDS <= e.keys(), MESSAGE_FIELDS - e.keys()
        assert str(e["client"]) == "127.0.0.1" and e["helo"] == "client.test"
        assert e["sender"] == sender and e["sid"] == conn["sid"]
    assert CONNECTION_FIELDS <= conn.keys()
    assert conn["client"] == "127.0.0.1" and conn["end"] == "quit"
    assert [str(conn[k]) for k in ("transactions", "accepted", "refused")] == ["4", "1", "3"]

    acc = by["accepted"]
    assert acc["action"] == "accept"
    assert acc["reply"] == f"250 2.0.0 Ok: queued as {qids['accepted']}"
    assert str(acc["size"]) == str(len(BODY))
    assert str(acc["score"]) in ("0", "0.0")
    assert "2 delivered" in acc["relay"]

    unk = by["unknown"]
    assert unk["action"] == "reject" and unk["by"] == "filter:rcpt"
    assert unk["reply"].startswith("550 5.1.1 <nobody@example.test>: Recipient address "
                                   "rejected: User unknown")
    assert unk["relay"] == "not relayed"

    pol = by["policy"]
    assert pol["action"] == "reject" and pol["by"] == "rule:no-from"
    assert pol["reply"] == f"550 5.7.1 A From header is required ({qids['policy']})"
    assert pol["relay"] == "not relayed"

    rel = by["relay"]
    assert rel["action"] == "reject" and rel["by"] == "relay-denied"
    assert rel["reply"] == f"550 5.7.1 Relay access denied ({qids['relay']})"
    return messages, conn


def received_ids(gw: GatewayProcess) -> list[str]:
    out = []
    for msg in gw.maildir_messages():
        m = re.search(rb"^Received: .*?\s+id\s+([0-9A-Z]{16})\b", msg, re.M | re.S)
        assert m, msg[:300]
        out.append(m.group(1).decode())
    return out


def test_json_message_and_connection_events(gateway_factory):
    gw = gateway_factory(logging_policy())
    qids = session(gw)
    messages, conn = check_session_events(gw, qids, SENDER)
    by = {e["qid"]: e for e in messages}
    acc = by[qids["accepted"]]
    assert acc["rcpts"] == [ALICE, CAROL] and acc["rcpt_refused"] == 0
    assert acc["score"] == 0 and acc["symbols"] == ["RCPT_KNOWN(0)"]
    assert isinstance(acc["stage_ms"], dict) and {"rcpt", "message"} <= acc["stage_ms"].keys()
    assert all(isinstance(v, int | float) and v >= 0 for v in acc["stage_ms"].values())
    pol = by[qids["policy"]]
    assert pol["rcpts"] == [ALICE]
    assert "HEADERS_MISSING_FROM(0)" in pol["symbols"]
    unk = by[qids["unknown"]]
    assert unk["rcpts"] == [] and unk["rcpt_refused"] == 1
    assert "RCPT_UNKNOWN(0)[nobody@example.test]" in unk["symbols"]
    assert conn["transactions"] == 4 and conn["accepted"] == 1 and conn["refused"] == 3
    # The qid of the 250 is the one in both delivered copies' Received header.
    assert received_ids(gw) == [qids["accepted"]] * 2


def test_json_connection_without_transactions(gateway_factory):
    gw = gateway_factory(logging_policy())
    c = connect(gw)
    assert c.cmd("EHLO quiet.test").split("\n")[-1].startswith("250 ")
    c.close()  # EOF, no QUIT
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    assert conn["end"] == "eof" and conn["helo"] == "quiet.test"
    assert (conn["transactions"], conn["accepted"], conn["refused"]) == (0, 0, 0)
    assert re.fullmatch(r"S[0-9A-Z]{15}", conn["sid"])
    assert gw.events("message") == []


def test_aborted_transaction_is_logged_once(gateway_factory):
    gw = gateway_factory(logging_policy())
    c = connect(gw)
    c.cmd("EHLO client.test")
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
    assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    conn = gw.wait_for(lambda e: e.get("event") == "connection")
    [ev] = gw.events("message")
    assert ev["action"] == "aborted" and ev["rcpts"] == [ALICE] and ev["reply"] is None
    assert (conn["transactions"], conn["accepted"], conn["refused"]) == (1, 0, 0)
    assert gw.maildir_messages() == []


QUOTED_SENDER = '"john doe"@sender.test'


def test_kv_lines_are_readable_with_the_same_fields(gateway_factory):
    gw = gateway_factory(logging_policy(), log_format="kv")
    qids = session(gw, sender=QUOTED_SENDER)
    check_session_events(gw, qids, QUOTED_SENDER)
    lines = {q: [x for x in gw.lines() if f" message qid={q} " in x] for q in qids.values()}
    assert all(len(v) == 1 for v in lines.values()), lines
    acc = lines[qids["accepted"]][0]
    assert acc.split(" ")[1:4] == ["info", "mailgate.message", "message"]
    assert not acc.lstrip().startswith("{")  # not JSON
    # Values with spaces (or quotes) are quoted; lists are comma-joined; the rest is bare.
    assert f' reply="250 2.0.0 Ok: queued as {qids["accepted"]}" ' in acc
    assert ' sender="\\"john doe\\"@sender.test" ' in acc
    assert f" rcpts={ALICE},{CAROL} " in acc
    assert f" size={len(BODY)} " in acc and " action=accept " in acc
    assert " client=127.0.0.1 " in acc and " helo=client.test " in acc
    assert re.search(r" stage_ms=\S*rcpt:[\d.]+", acc)
    for q, [line] in lines.items():
        rec = parse_kv_line(line)
        assert rec is not None and rec["qid"] == q
        # Every token after the event name is key=value: nothing unquoted has a space.
        rest = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line.split(" message ", 1)[1])
        assert all(re.fullmatch(r"\w+=\S*", tok) for tok in rest.split(" ")), rest
    [conn] = [x for x in gw.lines() if " connection sid=" in x]
    rec = parse_kv_line(conn)
    assert rec is not None and CONNECTION_FIELDS <= rec.keys()
    assert received_ids(gw) == [qids["accepted"]] * 2


@pytest.mark.parametrize("fmt", ["json", "kv"])
def test_qid_in_reply_log_and_received_header(gateway_factory, fmt):
    gw = gateway_factory(logging_policy(), log_format=fmt)
    c = connect(gw)
    c.cmd("EHLO client.test")
    finals = []
    for _ in range(3):
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == "250 2.1.0 Sender ok"
        assert c.cmd(f"RCPT TO:<{ALICE}>") == "250 2.1.5 Recipient ok"
        assert c.cmd("DATA").startswith("354 ")
        finals.append(c.cmd(BODY + b"."))
    c.cmd("QUIT")
    c.close()
    qids = [qid_of(f) for f in finals]
    assert len(set(qids)) == 3
    for q, final in zip(qids, finals, strict=True):
        ev = gw.message_event(q)
        assert ev["reply"] == final
        if fmt == "json":
            raw = next(x for x in gw.lines() if f'"qid": "{q}"' in x)
            assert json.loads(raw)["qid"] == q
    assert sorted(received_ids(gw)) == sorted(qids)
