"""The one fsync helper everything durable shares (spool, Maildir, quarantine): a renamed file is
only on disk once its directory is fsync'd too. Group commit in two forms: ``DirSync`` for
threads, ``Syncer`` for coroutines on the event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

from gateway import supervise

log = logging.getLogger("mailgate.spool")
WRITER_TASK = "fsync-writer"  # its name in supervise.FAILURES

# A durable change written as a generator: it makes its file-system calls itself and yields
# each fsync it needs (an open file descriptor, or the name of a directory the driver knows),
# resuming once that fsync has finished; a failed fsync is raised at the yield.
SyncSteps = Generator[int | str, None, None]
# Where a caller hands a chore nobody waits for (``Syncer.defer``).
Defer = Callable[[Callable[[], None]], None]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSync:
    """Group commit for one directory: concurrent callers of ``sync`` share fsyncs. A caller
    returns once an fsync that began after its call has finished, so every change it made to
    the directory before calling is durable; while one fsync runs, the callers that arrive
    meanwhile wait and are all covered by the next one. A failed fsync raises in its caller
    only; the others it would have covered try again themselves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._durable = 0  # every ticket up to this one is covered by a finished fsync
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._durable < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running, covers = True, self._asked
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._durable = max(self._durable, covers)


def run_steps(steps: SyncSteps, fsync: Callable[[int | str], None]) -> None:
    """Drive ``steps`` in this thread, doing each fsync with ``fsync``."""
    point = advance(steps, None)
    while point is not None:
        try:
            fsync(point)
        except BaseException as e:  # noqa: BLE001 - the steps clean up and re-raise
            point = advance(steps, e)
        else:
            point = advance(steps, None)


def advance(steps: SyncSteps, error: BaseException | None) -> int | str | None:
    """Resume ``steps`` after its last fsync (``error`` raised into it, where it cleans up and
    re-raises): the next fsync it asks for, or None when it is done. Both drivers use this."""
    try:
        return steps.throw(error) if error is not None else steps.send(None)
    except StopIteration:
        return None


class Syncer:
    """Group commit for coroutines: ``await sync(fd or directory)`` returns once an fsync of it
    that began after the call has finished. Requests made while one batch runs form the next;
    a batch is one trip to a worker thread, which fsyncs each file and each directory once,
    however many asked for it. So many concurrent commits cost a few thread trips rather than
    one each, and the loop's own calls never wait for the GIL behind a worker's dozen small
    ones. A failed fsync fails each request it would have covered.

    ``defer`` hands the same thread small chores nobody waits for (emptying spare files): they
    run after the batch's fsyncs. Chores pending when the loop stops are dropped.

    The batches run in one task while there are any, supervised (``gateway/supervise.py``,
    as ``fsync-writer``): should a batch fail as a whole (not an fsync: the thread trip), its
    requests fail, the failure is logged and counted, and the task runs again after a short
    backoff for the requests made meanwhile."""

    def __init__(self) -> None:
        self._next: list[tuple[int | Path, asyncio.Future[None]]] = []
        self._chores: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._dirs: dict[tuple[Path, str], Path] = {}  # (root, name) -> root / name, made once

    async def sync(self, target: int | Path) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.append((target, fut))
        self._start()
        await fut

    def defer(self, chore: Callable[[], None]) -> None:
        """Run ``chore`` in the worker thread with the next batch (one that raises is logged)."""
        self._chores.append(chore)
        self._start()

    def _start(self) -> None:
        if self._task is None:
            self._task = supervise.start(WRITER_TASK, self._drain)
            self._task.add_done_callback(self._ended)

    async def run(self, steps: SyncSteps, root: Path) -> None:
        """Drive ``steps`` on the loop; directories are named relative to ``root``."""
        point = advance(steps, None)
        while point is not None:
            try:
                if isinstance(point, int):
                    await self.sync(point)
                else:
                    path = self._dirs.get((root, point))
                    if path is None:
                        path = self._dirs[(root, point)] = root / point
                    await self.sync(path)
            except BaseException as e:  # noqa: BLE001 - the steps clean up and re-raise
                point = advance(steps, e)
            else:
                point = advance(steps, None)

    async def _drain(self) -> None:
        while self._next or self._chores:
            batch, self._next = self._next, []
            chores, self._chores = self._chores, []
            try:
                errors = await asyncio.to_thread(_batch, [t for t, _ in batch], chores)
            except BaseException:  # not known to be durable: those requests fail
                _fail(batch)
                raise
            for (_, fut), err in zip(batch, errors, strict=True):
                if fut.done():  # its waiter was cancelled
                    continue
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
        self._task = None  # no await since the check: the next request starts a new task

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The task ended (normally ``_drain`` has let go of it already): cancelled, e.g. the
        loop stopping; the requests still waiting fail."""
        if self._task is task:
            self._task = None
            _fail(self._next)
            self._next = []


def _fail(requests: list[tuple[int | Path, asyncio.Future[None]]]) -> None:
    for _, fut in requests:
        if not fut.done():
            fut.set_exception(OSError("fsync batch did not finish"))


def _batch(targets: list[int | Path], chores: Sequence[Callable[[], None]]
           ) -> list[OSError | None]:
    """One trip to a worker thread: the fsyncs, then the chores."""
    out = _fsync_all(targets)
    for chore in chores:
        try:
            chore()
        except Exception:  # a bug in a chore must not fail the commits of this batch
            log.exception("deferred chore failed")
    return out


def _fsync_all(targets: list[int | Path]) -> list[OSError | None]:
    """In a worker thread: fsync each file; each directory once (every request for it was made
    before this began)."""
    dirs: dict[Path, OSError | None] = {}
    out: list[OSError | None] = []
    for t in targets:
        if isinstance(t, Path):
            if t not in dirs:
                try:
                    fsync_dir(t)
                    dirs[t] = None
                except OSError as e:
                    dirs[t] = e
            out.append(dirs[t])
        else:
            try:
                os.fsync(t)
                out.append(None)
            except OSError as e:
                out.append(e)
    return out

