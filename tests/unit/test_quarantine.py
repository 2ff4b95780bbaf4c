"""gateway.quarantine on a temporary spool: store (hold/ + index), find with filters, get,
release (-> active/, fresh arrival), delete, expire by retention, the index rebuilt from hold/
(sync), failures that keep nothing, and busy messages left alone by expiry."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from gateway import quarantine as qm
from gateway.errors import SpoolError
from gateway.qid import new_qid
from gateway.queue_entry import QueueEntry, Recipient, SpoolBusy
from gateway.spool import Spool

SYMS = [qm.SymbolInfo("HEADERS_MISSING_DATE", 3.0, ("no Date",)),
        qm.SymbolInfo("SPF_FAIL", 2.5, ())]


def message(subject: str = "Cheap =?utf-8?q?w=C3=A4tches?=") -> bytes:
    return (f"Received: from x by mx.gateway.test\r\nX-Spam-Status: Yes, score=5.5\r\n"
            f"Subject: {subject}\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody\r\n").encode()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def store(q: qm.Quarantine, *, sender: str = "a@sender.test",
          rcpts: tuple[str, ...] = ("Bob@example.test", "carol@example.test"),
          at: float | None = None, data: bytes | None = None) -> QueueEntry:
    qid = new_qid()
    data = message() if data is None else data
    at = time.time() if at is None else at
    path = q.spool.incoming_path(qid).with_suffix(".final")
    path.write_bytes(data)
    entry = QueueEntry(
        qid=qid, sender=sender, mail_params=("BODY=8BITMIME",), envid="E1", ret="HDRS",
        recipients=tuple(Recipient(addr=r, notify=frozenset({"FAILURE"}), orcpt=f"rfc822;{r}")
                         for r in rcpts),
        arrival=at, size=len(data), client_ip="192.0.2.7", helo="client.sender.test",
        decision=qm.decision("quarantine", 5.5, "threshold:quarantine>=5", "default", SYMS, at))
    q.store(entry, path)
    assert not path.exists()
    return entry


def test_store_keeps_message_and_envelope_in_hold_and_indexes_it(spool):
    q = qm.Quarantine(spool)
    e = store(q)
    assert (spool.root / "hold" / f"{e.qid}.json").is_file()
    assert (spool.root / "data" / e.qid).read_bytes() == message()
    area, loaded = spool.load(e.qid)
    assert area == "hold" and loaded == e
    assert spool.due(time.time() + 10**6, 100) == []  # never picked by the queue manager
    [r] = q.find()
    assert r.qid == e.qid and r.sender == "a@sender.test"
    assert r.recipients == ("bob@example.test", "carol@example.test")
    assert r.score == 5.5 and r.reason == "threshold:quarantine>=5"
    assert r.symbols == tuple(SYMS) and r.policy_class == "default"
    assert r.subject == "Cheap wätches" and r.message_id == "<m1@sender.test>"
    assert (r.client_ip, r.helo, r.size) == ("192.0.2.7", "client.sender.test", len(message()))
    with sqlite3.connect(spool.root / qm.DB_NAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rec, entry = q.get(e.qid)
    assert rec == r and entry == e
    assert q.message(e.qid) == message()


def test_find_filters(spool):
    q = qm.Quarantine(spool)
    now = time.time()
    old = store(q, sender="spam@bad.test", at=now - 7200)
    new = store(q, sender="news@good.test", rcpts=("dave@example.test",), at=now)
    assert [r.qid for r in q.find()] == [old.qid, new.qid]
    assert [r.qid for r in q.find(since=now - 60)] == [new.qid]
    assert [r.qid for r in q.find(sender="BAD.test")] == [old.qid]
    assert [r.qid for r in q.find(rcpt="dave")] == [new.qid]
    assert [r.qid for r in q.find(rcpt="@example.test", limit=1)] == [old.qid]
    assert q.find(sender="%") == [] and q.find(rcpt="_") == []  # LIKE wildcards are literal


def test_release_moves_to_the_queue_with_a_fresh_arrival(spool):
    q = qm.Quarantine(spool)
    e = store(q, at=time.time() - 30 * 86400)
    before = time.time()
    released = q.release(e.qid)
    area, entry = spool.load(e.qid)
    assert area == "active" and entry == released
    assert entry.arrival >= before and entry.next_attempt <= time.time()
    assert entry.decision["original_arrival"] == e.arrival
    assert entry.recipients == e.recipients and entry.sender == e.sender
    assert spool.due(time.time(), 10) == [e.qid]
    assert q.find() == []
    with pytest.raises(qm.NotQuarantined):
        q.release(e.qid)  # now a queued message, not a quarantined one
    with pytest.raises(qm.NotQuarantined):
        q.get(e.qid)


def test_delete(spool):
    q = qm.Quarantine(spool)
    e = store(q)
    q.delete(e.qid)
    assert not (spool.root / "data" / e.qid).exists()
    assert not (spool.root / "hold" / f"{e.qid}.json").exists()
    assert q.find() == []
    with pytest.raises(qm.NotQuarantined):
        q.delete(e.qid)


def test_expire_deletes_only_what_is_older_than_the_retention(spool):
    q = qm.Quarantine(spool)
    now = time.time()
    old = store(q, at=now - 3 * 86400)
    young = store(q, at=now - 3600)
    assert q.expire(2 * 86400, now) == [old.qid]
    assert [r.qid for r in q.find()] == [young.qid]
    assert not (spool.root / "data" / old.qid).exists()
    assert q.expire(2 * 86400, now) == []


def test_expire_leaves_a_busy_message_for_next_time(spool):
    q = qm.Quarantine(spool)
    e = store(q, at=time.time() - 100)
    other = Spool(spool.root)  # another process's view: its own claims
    with other.claim(e.qid):
        assert q.expire(10) == []
        with pytest.raises(SpoolBusy):
            q.release(e.qid)
    assert q.expire(10) == [e.qid]


def test_sync_rebuilds_the_index_from_hold(spool):
    q = qm.Quarantine(spool)
    a, b = store(q), store(q)
    os.unlink(spool.root / qm.DB_NAME)
    for suffix in ("-wal", "-shm"):
        (spool.root / (qm.DB_NAME + suffix)).unlink(missing_ok=True)
    q2 = q  # the same instance: a database deleted under it is re-created
    assert q2.find() == []
    assert q2.sync() == (2, 0)
    assert [r.qid for r in q2.find()] == sorted([a.qid, b.qid], key=lambda x: (
        [a.qid, b.qid].index(x)))
    assert q2.find()[0].symbols == tuple(SYMS)
    # removed behind the quarantine's back (e.g. `mailgate queue delete`): the row goes
    with spool.claim(a.qid):
        spool.remove(a.qid)
    assert [r.qid for r in q2.find()] == [b.qid]  # hidden at once
    assert q2.sync(time.time() + 2 * qm.SYNC_GRACE_S) == (0, 1)  # dropped once surely gone


def test_sync_ignores_operator_held_queue_mail(spool):
    q = qm.Quarantine(spool)
    qid = new_qid()
    path = spool.incoming_path(qid)
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    spool.commit(QueueEntry(qid=qid, sender="a@b.test", recipients=(Recipient(addr="c@d.test"),),
                            arrival=time.time(), size=len(b"Subject: x\r\n\r\nbody\r\n"),
                            decision={"action": "accept"}), path, "hold")
    assert q.sync() == (0, 0) and q.find() == []
    with pytest.raises(qm.NotQuarantined):
        q.delete(qid)
    assert spool.load(qid)[0] == "hold"


def test_an_unusable_index_keeps_nothing(spool):
    q = qm.Quarantine(spool)
    (spool.root / qm.DB_NAME).mkdir()  # cannot be opened as a database
    with pytest.raises(qm.QuarantineError):
        store(q)
    assert os.listdir(spool.root / "hold") == [] and os.listdir(spool.root / "data") == []


def test_a_failed_commit_removes_the_index_row(spool):
    q = qm.Quarantine(spool)
    q.delete(store(q).qid)  # the index exists, hold/ is empty
    hold = spool.root / "hold"
    hold.rmdir()
    hold.write_bytes(b"not a directory\n")
    before = {r for (r,) in sqlite3.connect(spool.root / qm.DB_NAME).execute(
        "SELECT qid FROM messages")}
    with pytest.raises((SpoolError, OSError)):  # spool.commit's clean-up may raise OSError
        store(q)
    after = {r for (r,) in sqlite3.connect(spool.root / qm.DB_NAME).execute(
        "SELECT qid FROM messages")}
    assert after == before


def test_store_refuses_an_entry_that_is_not_quarantined(spool):
    q = qm.Quarantine(spool)
    qid = new_qid()
    path = spool.incoming_path(qid)
    path.write_bytes(b"x\r\n")
    entry = QueueEntry(qid=qid, sender="", recipients=(Recipient(addr="c@d.test"),),
                       arrival=time.time(), size=3, decision={"action": "accept"})
    with pytest.raises(qm.QuarantineError):
        q.store(entry, path)
    assert os.listdir(spool.root / "hold") == []


def test_policy_keys():
    from gateway.errors import PolicyError
    from gateway.policy.loader import parse_policy

    p = parse_policy({"quarantine": {"retention_s": 86400, "expire_interval_s": 5}}, "t.toml")
    assert (p.quarantine.retention_s, p.quarantine.expire_interval_s) == (86400.0, 5.0)
    with pytest.raises(PolicyError) as e:
        parse_policy({"quarantine": {"directory": "q", "retention_s": 0}}, "t.toml")
    assert e.value.problems[0].startswith("t.toml: quarantine.directory: no longer used: ")
    assert e.value.problems[1] == "t.toml: quarantine.retention_s: must be a number > 0"
