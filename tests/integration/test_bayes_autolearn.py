"""Bayes auto-learn through the on_decided hook, end to end: the real gateway decides, then
(in the background, after the reply) the bayes filter learns the message when its score
without the BAYES_ symbols passes a threshold; a message already learned is not relearned."""

from __future__ import annotations

import time
from pathlib import Path

from filters._bayesstore import SqliteReader
from tests.support.accepted import send_accepted
from tests.support.gateway import base_policy
from tests.support.sink import Sink

RCPT = "alice@example.test"


def message(n: int, *, date: bool) -> bytes:
    head = f"From: bob@sender.test\r\nTo: {RCPT}\r\nSubject: note {n}\r\n" \
           f"Message-ID: <m{n}@sender.test>\r\n"
    if date:
        head += "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
    return (head + f"\r\nbody text number {n} with some words\r\n").encode()


def test_autolearn_learns_by_score_without_bayes_and_never_twice(gateway_factory,
                                                                  tmp_path: Path) -> None:
    db = tmp_path / "bayes.db"
    with Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                     {"name": "headers", "on_error": "continue"},
                     {"name": "bayes", "db_path": str(db), "min_spam": 0, "min_ham": 0,
                      "autolearn_spam_at": 4.0, "autolearn_ham_below": 0.5}],
            scores={"HEADERS_MISSING_DATE": 4.5, "HEADERS_MISSING_MESSAGE_ID": 2.0},
            actions={"add_header": 5.0, "reject": 15.0})
        gw = gateway_factory(policy)

        def learned(qid: str) -> dict:
            return gw.wait_for(lambda e: e.get("event") == "bayes_autolearn"
                               and e.get("qid") == qid)

        spam_qid = send_accepted(gw.address, RCPT, message(1, date=False))  # 4.5 without Bayes: spam
        assert (learned(spam_qid)["klass"], learned(spam_qid)["outcome"]) == ("spam", "learned")
        ham_qid = send_accepted(gw.address, RCPT, message(2, date=True))  # 0 without Bayes: ham
        assert (learned(ham_qid)["klass"], learned(ham_qid)["outcome"]) == ("ham", "learned")
        again = send_accepted(gw.address, RCPT, message(1, date=False))  # the same message: known, not counted twice
        assert learned(again)["outcome"] == "known"
        # 2.0 (no Message-ID), between the thresholds: not learned at all
        between = send_accepted(gw.address, RCPT, message(3, date=True).replace(b"Message-ID", b"X-Id"))
        later = send_accepted(gw.address, RCPT, message(4, date=True))
        assert learned(later)["klass"] == "ham"  # the hooks of later mail have run
        time.sleep(0.3)
        assert not [e for e in gw.events("bayes_autolearn") if e.get("qid") == between]
    snap = SqliteReader(db).snapshot([])
    assert (snap.nspam, snap.nham) == (1, 2)
    ev = gw.message_event(spam_qid)
    assert any(s.startswith("BAYES_") for s in ev["symbols"]), ev["symbols"]
