"""Group commit of directory fsyncs (gateway.durable.DirSync): concurrent callers share fsyncs,
and nobody returns before an fsync that began after its call has finished."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from gateway import durable


def test_concurrent_syncs_share_fsyncs_and_each_waits_for_one_begun_after_it(
        tmp_path: Path, monkeypatch):
    spans: list[tuple[float, float]] = []

    def slow_fsync(path: Path) -> None:
        start = time.monotonic()
        time.sleep(0.05)
        spans.append((start, time.monotonic()))

    monkeypatch.setattr(durable, "fsync_dir", slow_fsync)
    ds = durable.DirSync(tmp_path)
    calls: list[tuple[float, float]] = []
    lock = threading.Lock()

    def caller() -> None:
        asked = time.monotonic()
        ds.sync()
        with lock:
            calls.append((asked, time.monotonic()))

    threads = [threading.Thread(target=caller) for _ in range(20)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert len(calls) == 20
    assert len(spans) < 10, f"{len(spans)} fsyncs for 20 callers: not shared"
    for asked, returned in calls:  # covered by an fsync that began after the call
        assert any(asked <= start and end <= returned for start, end in spans), (asked, spans)


def test_a_failed_fsync_raises_in_its_caller_and_the_next_caller_tries_again(
        tmp_path: Path, monkeypatch):
    results = iter([OSError(5, "I/O error"), None])

    def flaky(path: Path) -> None:
        err = next(results)
        if err:
            raise err

    monkeypatch.setattr(durable, "fsync_dir", flaky)
    ds = durable.DirSync(tmp_path)
    with pytest.raises(OSError, match="I/O error"):
        ds.sync()
    ds.sync()  # the second fsync succeeds: no error left behind
    with pytest.raises(StopIteration):
        next(results)


def test_deferred_chores_run_in_the_batch_thread_and_a_failing_one_fails_no_commit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``Syncer.defer``: chores run in the worker thread with a batch, after its fsyncs; one
    that raises is logged, and the fsync requests of the same batch still succeed."""
    import asyncio

    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("chore bug")

    async def main() -> int:
        syncer = durable.Syncer()
        syncer.defer(lambda: ran.append(threading.get_ident()))
        syncer.defer(broken)
        await syncer.sync(tmp_path)  # same batch as the chores: must not fail
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(ran) == 1 and ran[0] != loop_thread
    assert "deferred chore failed" in caplog.text and "chore bug" in caplog.text
