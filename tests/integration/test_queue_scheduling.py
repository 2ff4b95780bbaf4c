"""How the queue manager finds work: a fresh commit is delivered at once (no scan; handed over
with its claim, without a read of its metadata), and a backlog larger than one scan's batch
drains at delivery speed instead of one batch per ``scan_interval_s`` (the first bench run
found it capped at 2 × max_active per interval)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import pytest

from gateway import spool as spool_mod
from gateway.durable import Syncer
from gateway.policy.loader import parse_policy
from gateway.qid import new_qid
from gateway.qmgr import QueueManager
from gateway.queue_entry import QueueEntry, Recipient
from gateway.spool import Spool
from tests.support.sink import Sink


def _policy(sink: Sink, max_active: int = 5) -> object:
    return parse_policy({"relay": {"mode": "queue",
                                   "downstream": f"smtp://127.0.0.1:{sink.port}"},
                         "queue": {"scan_interval_s": 60, "max_active": max_active}}, "t.toml")


def _commit(spool: Spool, n: int) -> list[str]:
    qids = []
    for i in range(n):
        qid = new_qid()
        data = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        path = spool.incoming_path(qid)
        path.write_bytes(data)
        spool.commit(QueueEntry(qid=qid, sender="a@sender.test",
                                recipients=(Recipient(addr="r@example.test"),),
                                arrival=time.time(), size=len(data)), path)
        qids.append(qid)
    return qids


async def _until(pred, timeout_s: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            break
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_a_backlog_larger_than_a_batch_drains_without_waiting_for_the_next_scan(tmp_path: Path):
    with Sink() as sink:
        policy = _policy(sink)
        spool = Spool(tmp_path / "spool")
        _commit(spool, 60)  # six batches of 2 × max_active

        async def run() -> float:
            qmgr = QueueManager(spool, policy)
            task = asyncio.create_task(qmgr.run())
            took = await _until(lambda: len(sink.messages) >= 60, 20)
            await qmgr.stop(1)
            task.cancel()
            return took

        took = asyncio.run(run())
    assert len(sink.messages) == 60, f"{len(sink.messages)}/60 delivered in {took:.1f} s"
    assert took < 20
    assert list(spool.entries("active")) == [] and list(spool.entries("deferred")) == []
    assert sorted(m.data.split(b"\r\n")[0] for m in sink.messages) == \
        sorted(f"Subject: {i}".encode() for i in range(60))


def test_a_fresh_commit_is_delivered_at_once_without_a_scan(tmp_path: Path):
    with Sink() as sink:
        policy = _policy(sink)
        spool = Spool(tmp_path / "spool")

        async def run() -> list[float]:
            qmgr = QueueManager(spool, policy)
            task = asyncio.create_task(qmgr.run())
            await asyncio.sleep(0.2)  # the first scan found nothing; the next is in 60 s
            waits = []
            for n in range(1, 4):
                (qid,) = await asyncio.to_thread(_commit, spool, 1)
                qmgr.kick(qid)
                waits.append(await _until(lambda n=n: len(sink.messages) >= n, 5))
            await qmgr.stop(1)
            task.cancel()
            return waits

        waits = asyncio.run(run())
    assert len(sink.messages) == 3
    assert max(waits) < 2, waits


def test_due_leaves_out_what_it_is_told_to_skip(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    qids = _commit(spool, 4)
    assert spool.due(time.time(), 10) == qids
    assert spool.due(time.time(), 10, frozenset(qids[:2])) == qids[2:]
    assert spool.due(time.time(), 1, frozenset(qids[:1])) == qids[1:2]


async def _commit_kept(spool: Spool, syncer: Syncer, i: int) -> tuple[str, QueueEntry, int]:
    """Commit as a receiving session does (on its own descriptor, lock kept); returns the qid,
    the entry and a descriptor holding the lock, as the engine hands them to ``kick``."""
    qid = new_qid()
    data = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
    path = spool.incoming_path(qid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        entry = QueueEntry(qid=qid, sender="a@sender.test",
                           recipients=(Recipient(addr="r@example.test"),),
                           arrival=time.time(), size=len(data))
        lock = await spool.commit_async(entry, path, syncer, link=True, fd=fd, keep_lock=True)
        assert lock is not None
        return qid, entry, lock
    finally:
        os.close(fd)
        path.unlink()


def _locked(spool: Spool, qid: str) -> bool:
    """Someone holds the message's lock (False once it is delivered and gone)."""
    try:
        fd = os.open(spool.root / "data" / qid, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_fresh_commit_handed_over_is_delivered_without_a_claim_or_a_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reads: list[str] = []
    real_read = Spool._read

    def counted(self: Spool, area: spool_mod.Area, qid: str) -> QueueEntry:
        reads.append(qid)
        return real_read(self, area, qid)

    monkeypatch.setattr(Spool, "_read", counted)
    with Sink() as sink:
        spool = Spool(tmp_path / "spool")

        async def run() -> tuple[bool, bool]:
            qmgr = QueueManager(spool, _policy(sink))
            task = asyncio.create_task(qmgr.run())
            await asyncio.sleep(0.2)  # the first scan found nothing; the next is in 60 s
            qid, entry, lock = await _commit_kept(spool, qmgr.syncer, 1)
            locked_before = _locked(spool, qid)  # the claim held since the commit
            qmgr.kick(qid, entry, lock)
            await _until(lambda: len(sink.messages) >= 1 and not qmgr.busy, 5)
            await qmgr.stop(1)
            task.cancel()
            return locked_before, (spool.root / "data" / qid).exists()

        locked_before, data_left = asyncio.run(run())
    assert locked_before
    assert len(sink.messages) == 1 and sink.messages[0].data.startswith(b"Subject: 1\r\n")
    assert reads == []  # neither a claim's read nor a scan's
    assert not data_left and list(spool.entries("active")) == []


def test_handed_claims_not_started_are_released_at_stop(tmp_path: Path):
    """One delivery at a time to a slow sink: the fresh commits behind it give their locks
    back when the manager stops, and stay queued for the next start."""
    with Sink(delay_s=0.5, delay_on={"DATA_END"}) as sink:
        spool = Spool(tmp_path / "spool")

        async def run() -> list[str]:
            qmgr = QueueManager(spool, _policy(sink, max_active=1))
            task = asyncio.create_task(qmgr.run())
            await asyncio.sleep(0.2)
            qids = []
            for i in range(4):
                qid, entry, lock = await _commit_kept(spool, qmgr.syncer, i)
                qmgr.kick(qid, entry, lock)
                qids.append(qid)
            await asyncio.sleep(0.2)  # the first is at the sink, the rest wait for its slot
            await qmgr.stop(2)
            task.cancel()
            return qids

        qids = asyncio.run(run())
    assert not any(_locked(spool, q) for q in qids)
    left = [e.qid for e in spool.entries("active")]
    assert len(sink.messages) + len(left) == 4 and len(left) >= 2, (len(sink.messages), left)


def test_a_handed_claim_for_a_message_already_in_an_attempt_is_released(tmp_path: Path):
    with Sink() as sink:
        spool = Spool(tmp_path / "spool")

        async def run() -> bool:
            qmgr = QueueManager(spool, _policy(sink))
            qid, entry, lock = await _commit_kept(spool, qmgr.syncer, 1)
            qmgr.busy.add(qid)  # as if a scan had started an attempt for it meanwhile
            qmgr.kick(qid, entry, lock)
            return _locked(spool, qid)

        assert asyncio.run(run()) is False  # released: the attempt under way can claim it


def test_a_scan_failing_at_every_interval_logs_its_traceback_once_and_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A spool that cannot be scanned (here: ``Spool.due`` raising at every call) must not
    write a traceback every ``scan_interval_s`` (17,000 a day at the default 5 s) nor go
    uncounted: like the supervised tasks, its traceback once, then one short line per scan,
    counted in ``supervise.FAILURES["queue-scan"]``; scanning goes on, and once a scan works
    again the queue is delivered. The old code logged ``queue scan failed`` with a traceback
    at every scan and counted nothing."""
    import logging

    from gateway import supervise
    from gateway.qmgr import SCAN_TASK

    caplog.set_level(logging.ERROR)
    calls: list[int] = []
    real_due = Spool.due

    def due_failing(self: Spool, now: float, limit: int, skip: frozenset[str] = frozenset()
                    ) -> list[str]:
        calls.append(1)
        if len(calls) <= 5:
            raise PermissionError(13, "Permission denied", str(self.root / "active"))
        return real_due(self, now, limit, skip)

    monkeypatch.setattr(Spool, "due", due_failing)
    with Sink() as sink:
        policy = parse_policy({"relay": {"mode": "queue",
                                         "downstream": f"smtp://127.0.0.1:{sink.port}"},
                               "queue": {"scan_interval_s": 0.05}}, "t.toml")
        spool = Spool(tmp_path / "spool")
        _commit(spool, 1)
        before = supervise.FAILURES[SCAN_TASK]

        async def run() -> None:
            qmgr = QueueManager(spool, policy)
            task = asyncio.create_task(qmgr.run())
            await _until(lambda: len(sink.messages) >= 1, 20)
            await qmgr.stop(1)
            task.cancel()

        asyncio.run(run())
    assert len(sink.messages) == 1 and len(calls) >= 6
    assert supervise.FAILURES[SCAN_TASK] - before == 5  # old code: 0
    failed = [r for r in caplog.records if "Permission denied" in r.getMessage()
              or (r.exc_info and "Permission denied" in str(r.exc_info[1]))]
    assert len(failed) == 5, [r.getMessage() for r in failed]
    assert sum(r.exc_info is not None for r in failed) == 1  # old code: 5 tracebacks
