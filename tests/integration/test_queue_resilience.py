"""The queue manager when saving an outcome fails (a full disk): the outcome it could not save is
applied to the next attempt, and the message pauses instead of being retried on every scan — no
recipient gets a second copy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.policy.loader import parse_policy
from gateway.qmgr import QueueManager
from gateway.queue_entry import QueueEntry, Recipient
from gateway.spool import Spool
from tests.support.sink import Sink


def test_a_failed_save_neither_redelivers_nor_storms(tmp_path: Path, monkeypatch):
    with Sink(replies={"RCPT:later@example.test": "451 4.2.0 busy"}) as sink:
        policy = parse_policy({"relay": {"mode": "queue",
                                         "downstream": f"smtp://127.0.0.1:{sink.port}"},
                               "queue": {"scan_interval_s": 0.05, "min_backoff_s": 0.5,
                                         "max_backoff_s": 0.5}}, "t.toml")
        spool = Spool(tmp_path / "spool")
        data = b"Subject: once\r\n\r\nbody\r\n"
        path = spool.incoming_path("06H2800000000001")
        path.write_bytes(data)
        spool.commit(QueueEntry(qid="06H2800000000001", sender="a@sender.test",
                                recipients=(Recipient(addr="now@example.test"),
                                            Recipient(addr="later@example.test")),
                                arrival=time.time(), size=len(data)), path)
        real_update, failures = spool.update, []

        def update(entry, area):  # the first save hits a full disk
            if not failures:
                failures.append(entry)
                raise OSError(28, "No space left on device")
            return real_update(entry, area)

        monkeypatch.setattr(spool, "update", update)

        async def run() -> list[str]:
            qmgr = QueueManager(spool, policy)
            task = asyncio.create_task(qmgr.run())
            await asyncio.sleep(1.6)
            await qmgr.stop(1)
            task.cancel()
            return [c for c in sink.commands if c.upper().startswith("RCPT")]

        rcpts = asyncio.run(run())
    assert failures, "the failing save was never reached"
    delivered = [m for m in sink.messages if "now@example.test" in m.rcpts]
    assert len(delivered) == 1, f"{len(delivered)} copies for the delivered recipient"
    # paused after the failure, then retried by backoff: a handful of attempts, not a storm
    later = [c for c in rcpts if "later@" in c]
    assert 2 <= len(later) <= 4, later
