"""A real gateway (``gateway.app.Runtime`` in this process, listening on loopback, relaying to
a sink) whose background work is killed by injected exceptions and goes on (issue 25): the
queue manager's loop, whose first scan raises (the old loop died with it: no mail was ever
delivered), and Bayes auto-learn, whose first write raises. Each failure is logged once with
its traceback and counted in ``supervise.FAILURES``."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

import filters.bayes as bayes_mod
from gateway import supervise
from gateway.app import QMGR_TASK, Runtime
from gateway.qid import new_qid
from gateway.queue_entry import QueueEntry, Recipient
from tests.support import toml
from tests.support.accepted import send_accepted
from tests.support.gateway import base_policy
from tests.support.sink import Sink

RCPT = "alice@example.test"


def _message(n: int) -> bytes:
    return (f"From: bob@sender.test\r\nTo: {RCPT}\r\nSubject: note {n}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m{n}@sender.test>\r\n"
            f"\r\nbody text number {n} with some words\r\n").encode()


async def _until(pred: Any, timeout_s: float = 15) -> bool:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.05)
    return True


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.__dict__.get("mailgate_fields", {}) for r in caplog.records
            if r.getMessage() == name]


def test_queue_manager_and_autolearn_run_again_after_injected_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    learn_calls: list[int] = []
    real_learn = bayes_mod._learn_one

    def learn_failing_once(db_path: Path, change: Any) -> str:
        learn_calls.append(1)
        if len(learn_calls) == 1:
            raise RuntimeError("injected auto-learn failure")
        return real_learn(db_path, change)

    monkeypatch.setattr(bayes_mod, "_learn_one", learn_failing_once)
    with Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            relay={"mode": "queue"}, spool={"directory": str(tmp_path / "spool")},
            queue={"scan_interval_s": 0.5},
            filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                     {"name": "bayes", "db_path": str(tmp_path / "bayes.db"), "min_spam": 0,
                      "min_ham": 0, "autolearn_spam_at": 4.0, "autolearn_ham_below": 0.5}])
        path = tmp_path / "policy.toml"
        path.write_text(toml.dumps(policy))

        async def main() -> tuple[list[str], str]:
            runtime = Runtime(path)
            real_scan, scans = runtime.qmgr._scan, []

            async def scan_failing_once() -> list[str]:
                scans.append(1)
                if len(scans) == 1:
                    raise RuntimeError("injected queue scan failure")
                return await real_scan()

            runtime.qmgr._scan = scan_failing_once  # type: ignore[method-assign]
            await runtime.start()  # the first scan runs at once, and fails
            port = runtime.servers[0].sockets[0].getsockname()[1]
            qids = [await asyncio.to_thread(send_accepted, ("127.0.0.1", port), RCPT, _message(n)) for n in (1, 2)]
            # committed by "another worker": only a scan finds it
            other = new_qid()
            data = _message(3)
            incoming = runtime.spool.incoming_path(other)
            incoming.write_bytes(data)
            runtime.spool.commit(QueueEntry(qid=other, sender="bob@sender.test",
                                            recipients=(Recipient(addr=RCPT),),
                                            arrival=time.time(), size=len(data)), incoming)
            await _until(lambda: len(sink.messages) >= 3
                         and len(_events(caplog, "bayes_autolearn")) >= 1)
            await runtime.stop()
            return qids, other

        before = {k: supervise.FAILURES[k] for k in (QMGR_TASK, "on_decided:bayes")}
        (first, second), other = asyncio.run(main())
        delivered = [m.data for m in sink.messages]
    # the queue manager runs again: the two messages sent and the one only a scan finds
    assert len(delivered) == 3, delivered
    assert {b"Subject: note 1", b"Subject: note 2", b"Subject: note 3"} == {
        line for d in delivered for line in d.split(b"\r\n") if line.startswith(b"Subject:")}
    assert supervise.FAILURES[QMGR_TASK] - before[QMGR_TASK] == 1
    # auto-learn: the first message's write failed, the second was learned
    learned = _events(caplog, "bayes_autolearn")
    assert [(e["qid"], e["outcome"]) for e in learned] == [(second, "learned")], learned
    assert supervise.FAILURES["on_decided:bayes"] - before["on_decided:bayes"] == 1
    for text, qid in (("injected queue scan failure", None),
                      ("injected auto-learn failure", first)):
        logged = [r for r in caplog.records if r.exc_info and text in str(r.exc_info[1])]
        assert len(logged) == 1, text  # once, with its traceback
        assert qid is None or qid in logged[0].getMessage()
    assert "never retrieved" not in caplog.text


def test_a_failure_while_stopping_is_reported_and_the_gateway_still_stops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM runs ``Runtime.stop`` as a background chore; when a step of it raises (here the
    queue manager's stop), the failure is logged with its traceback and counted, and the
    gateway stops all the same. The old ``stop`` never set ``stopped`` after such a failure:
    ``run_forever`` waited for ever, and the process only ended with a SIGKILL."""
    caplog.set_level(logging.INFO)
    with Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            relay={"mode": "queue"}, spool={"directory": str(tmp_path / "spool")},
            limits={"shutdown_grace_s": 1})
        path = tmp_path / "policy.toml"
        path.write_text(toml.dumps(policy))

        async def main() -> bool:
            runtime = Runtime(path)

            async def stop_failing(grace_s: float) -> None:
                raise RuntimeError("injected failure while stopping")

            runtime.qmgr.stop = stop_failing  # type: ignore[method-assign]
            await runtime.start()
            serving = asyncio.create_task(runtime.stopped.wait())  # run_forever's wait
            runtime.background(runtime.stop())  # what the SIGTERM handler does
            done, _ = await asyncio.wait({serving}, timeout=10)
            if not done:
                serving.cancel()
            return bool(done)

        before = supervise.FAILURES["Runtime.stop"]
        assert asyncio.run(main())  # old code: still waiting after 10 s
    assert supervise.FAILURES["Runtime.stop"] - before == 1
    logged = [r for r in caplog.records
              if r.exc_info and "injected failure while stopping" in str(r.exc_info[1])]
    assert len(logged) == 1
