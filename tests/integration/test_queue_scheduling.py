"""How the queue manager finds work: a fresh commit is delivered at once (no scan), and a
backlog larger than one scan's batch drains at delivery speed instead of one batch per
``scan_interval_s`` (the first bench run found it capped at 2 × max_active per interval)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.policy.loader import parse_policy
from gateway.qid import new_qid
from gateway.qmgr import QueueManager
from gateway.queue_entry import QueueEntry, Recipient
from gateway.spool import Spool
from tests.support.sink import Sink


def _policy(sink: Sink) -> object:
    return parse_policy({"relay": {"mode": "queue",
                                   "downstream": f"smtp://127.0.0.1:{sink.port}"},
                         "queue": {"scan_interval_s": 60, "max_active": 5}}, "t.toml")


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
