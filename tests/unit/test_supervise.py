"""Background tasks never die silently (issue 25): ``gateway/supervise.py`` restarts a failed
long-lived task after a capped exponential backoff, logs each failure once with its traceback
and counts it per task name. Here the supervisor itself, the fsync writer
(``gateway/durable.py``) and quarantine expiry, each killed by an injected exception and seen
doing its job afterwards. (The pools' reapers: tests/unit/test_pool.py; the queue manager and
Bayes auto-learn: tests/integration/test_supervised_tasks.py.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

from gateway import durable, supervise
from gateway import quarantine as qm
from gateway.policy.schema import QuarantineConfig
from gateway.spool import Spool
from tests.unit.test_quarantine import store


def _tracebacks(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and text in str(r.exc_info[1])]


def test_a_failing_task_restarts_with_capped_exponential_backoff_logged_once_and_counted(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(supervise, "MIN_BACKOFF_S", 0.02)
    monkeypatch.setattr(supervise, "MAX_BACKOFF_S", 0.08)
    runs: list[float] = []

    async def body() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) <= 5:
            raise RuntimeError("injected: always the same failure")

    async def main() -> bool:
        task = supervise.start("test-backoff", body)
        await asyncio.wait({task}, timeout=10)
        return task.done() and task.exception() is None

    before = supervise.FAILURES["test-backoff"]
    assert asyncio.run(main())  # ended normally once the body returned
    assert len(runs) == 6
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    for gap, backoff in zip(gaps, (0.02, 0.04, 0.08, 0.08, 0.08), strict=True):
        assert gap >= backoff * 0.9, gaps  # doubled each time, capped at MAX_BACKOFF_S
    assert supervise.FAILURES["test-backoff"] - before == 5
    # the same failure five times: its traceback once, then one short line each
    assert len(_tracebacks(caplog, "injected: always the same failure")) == 1
    again = [r for r in caplog.records if "test-backoff failed again" in r.getMessage()]
    assert len(again) == 4 and "restarting in" in again[-1].getMessage()


def test_cancelling_a_supervised_task_ends_it_without_a_report() -> None:
    async def body() -> None:
        await asyncio.sleep(3600)

    async def main() -> bool:
        task = supervise.start("test-cancel", body)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return task.cancelled()

    assert asyncio.run(main())
    assert supervise.FAILURES["test-cancel"] == 0


def test_the_fsync_writer_fails_only_its_batch_and_serves_the_next_after_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A batch that fails as a whole (the thread trip, not an fsync) fails its own requests;
    one made while it ran is served by the writer started again (the old writer failed it
    too: "fsync batch did not finish"), the failure is logged once with its traceback and
    counted as ``fsync-writer``."""
    real, gate, calls = durable._batch, threading.Event(), []

    def batch_failing_once(targets: list[int | Path], chores: list[object]) -> object:
        calls.append(len(targets))
        if len(calls) == 1:
            gate.wait(10)
            raise RuntimeError("injected fsync batch failure")
        return real(targets, chores)  # type: ignore[arg-type]

    monkeypatch.setattr(durable, "_batch", batch_failing_once)

    async def main() -> tuple[BaseException | None, BaseException | None, bool]:
        syncer = durable.Syncer()
        first = asyncio.ensure_future(syncer.sync(tmp_path))
        await asyncio.sleep(0.1)  # the first batch is in its thread, waiting for the gate
        second = asyncio.ensure_future(syncer.sync(tmp_path))
        await asyncio.sleep(0.05)
        gate.set()
        done, _ = await asyncio.wait({first, second}, timeout=10)
        await syncer.sync(tmp_path)  # and later ones as ever
        return first.exception(), second.exception(), len(done) == 2

    before = supervise.FAILURES[durable.WRITER_TASK]
    first, second, both = asyncio.run(main())
    assert both
    assert isinstance(first, OSError)  # its batch failed: not known to be durable
    assert second is None  # the writer ran again and fsync'd it
    assert calls == [1, 1, 1]
    assert supervise.FAILURES[durable.WRITER_TASK] - before == 1
    assert len(_tracebacks(caplog, "injected fsync batch failure")) == 1


def test_quarantine_expiry_runs_again_after_a_failed_pass_and_after_dying(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Two injected failures: the policy lookup raises once (the loop itself dies: the
    supervisor starts it again; the old loop stayed dead) and then one expiry pass raises
    (reported, the next pass at the interval). Afterwards the expired message is gone."""
    spool = Spool(tmp_path / "spool")
    q = qm.Quarantine(spool)
    old = store(q, at=time.time() - 3 * 86400)
    real_expire, config_calls, expire_calls = qm.Quarantine.expire, [], []

    def expire_failing_once(self: qm.Quarantine, retention_s: float,
                            now: float | None = None) -> list[str]:
        expire_calls.append(1)
        if len(expire_calls) == 1:
            raise RuntimeError("injected expiry pass failure")
        return real_expire(self, retention_s, now)

    def config() -> QuarantineConfig:
        config_calls.append(1)
        if len(config_calls) == 1:
            raise KeyError("injected policy lookup failure")
        return QuarantineConfig(retention_s=86400, expire_interval_s=0.2)

    monkeypatch.setattr(qm.Quarantine, "expire", expire_failing_once)

    async def main() -> bool:
        task = supervise.start(qm.EXPIRY_TASK, lambda: qm.expire_loop(spool, config))
        end = time.monotonic() + 10
        while (spool.root / "data" / old.qid).exists():
            if time.monotonic() > end:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return not (spool.root / "data" / old.qid).exists()

    before = supervise.FAILURES[qm.EXPIRY_TASK]
    assert asyncio.run(main())  # expired in the end
    assert q.find() == []
    assert len(expire_calls) >= 2 and len(config_calls) >= 3
    assert supervise.FAILURES[qm.EXPIRY_TASK] - before == 2
    assert len(_tracebacks(caplog, "injected policy lookup failure")) == 1
    assert len(_tracebacks(caplog, "injected expiry pass failure")) == 1


def test_a_failure_after_a_successful_run_is_logged_with_its_traceback_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Only a repeat *in a row* is shortened to one line. A task that failed, then did its
    job (its run returned, as each reaping and each fsync batch does), and fails the same way
    later gets its traceback logged again; the old code remembered the first failure forever
    and logged every later one as "failed again", without a traceback."""
    monkeypatch.setattr(supervise, "MIN_BACKOFF_S", 0.01)
    runs: list[int] = []

    async def body() -> None:  # fails at its 1st and 3rd run: returns at its 2nd and 4th
        runs.append(1)
        if len(runs) in (1, 3):
            raise RuntimeError("injected: fails on odd runs")

    async def main() -> None:
        for _ in range(2):  # two tasks of one name, one after the other (as reapers are)
            task = supervise.start("test-recovered", body)
            await asyncio.wait({task}, timeout=10)
            assert task.done() and task.exception() is None

    before = supervise.FAILURES["test-recovered"]
    asyncio.run(main())
    assert len(runs) == 4
    assert supervise.FAILURES["test-recovered"] - before == 2
    assert len(_tracebacks(caplog, "injected: fails on odd runs")) == 2  # old code: 1
    assert not [r for r in caplog.records if "test-recovered failed again" in r.getMessage()]


def test_an_expiry_pass_failing_again_after_a_good_pass_is_logged_with_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The quarantine expiry loop reports a failed pass and goes on; a good pass in between
    makes the next failure news again (traceback), as for a supervised task's run."""
    spool = Spool(tmp_path / "spool")
    calls: list[int] = []

    def expire_failing_on_odd_calls(self: qm.Quarantine, retention_s: float,
                                    now: float | None = None) -> list[str]:
        calls.append(1)
        if len(calls) in (1, 3):
            raise RuntimeError("injected expiry failure on odd passes")
        return []

    monkeypatch.setattr(qm.Quarantine, "expire", expire_failing_on_odd_calls)

    async def main() -> None:
        task = supervise.start(qm.EXPIRY_TASK, lambda: qm.expire_loop(
            spool, lambda: QuarantineConfig(retention_s=86400, expire_interval_s=0.02)))
        for _ in range(500):  # at most ~10 s
            if len(calls) >= 4:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.wait({task}, timeout=5)

    asyncio.run(main())
    assert len(calls) >= 4
    assert len(_tracebacks(caplog, "injected expiry failure on odd passes")) == 2  # old: 1


def test_a_body_whose_clean_up_raises_on_cancel_still_ends_the_task() -> None:
    """Cancelled (the loop shutting down), a body whose clean-up raises another exception
    instead of CancelledError: the failure is reported, and the task ends as cancelled. The
    old supervisor took it for an ordinary failure and started the body again: the
    cancellation was lost and the task ran on (asyncio.run's shutdown waits for it for
    ever)."""
    runs: list[int] = []

    async def body() -> None:
        runs.append(1)
        try:
            await asyncio.sleep(3600)
        finally:
            if len(runs) == 1:  # (once: so that the old code's task can be ended here)
                raise OSError(9, "Bad file descriptor")  # e.g. closing a lock twice

    async def main() -> tuple[bool, int]:
        task = supervise.start("test-cancel-cleanup", body)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        ended = task.done() and task.cancelled()
        if not task.done():
            task.cancel()  # the old code: a second cancel lands in the backoff sleep
            await asyncio.wait({task}, timeout=2)
        return ended, len(runs)

    before = supervise.FAILURES["test-cancel-cleanup"]
    ended, n = asyncio.run(main())
    assert ended and n == 1  # old code: not ended, the body started again
    assert supervise.FAILURES["test-cancel-cleanup"] - before == 1
