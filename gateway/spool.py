"""The durable queue on disk: commit accepted messages, claim them across processes, move them
between areas, and bring the spool back to a consistent state after a crash. Blocking by design:
callers on the event loop use ``asyncio.to_thread``, except for the two calls made for every
message, ``commit_async`` and ``remove_async``: there the loop makes the quick file-system calls
itself and a ``durable.Syncer`` batches the fsyncs of all concurrent callers into one thread
trip. Both forms run the same protocol (``_commit_steps``, ``_remove_steps``).

Layout under the root (directories 0700, files 0600)::

    incoming/<qid>.tmp      DATA while it streams in; never acknowledged
    data/<qid>              the message bytes as received, one file per queued message
    active/<qid>.json       metadata: ready for delivery now
    deferred/<qid>.json     metadata: waiting for ``next_attempt``
    hold/<qid>.json         metadata: quarantined or held by an operator; never due
    corrupt/                unreadable files moved aside, each with a ``.reason``; never deleted
    spare/                  empty files kept for reuse as new ones (``gateway.spares``)
    <area>/<qid>.json.tmp   a metadata write in progress

Commit (``commit``): fsync the data, rename (or, with ``link``, hard-link: the receiving session
keeps its name for the file until it is done, and the bytes are neither copied nor given a
second inode) it to ``data/<qid>``, fsync ``data/``; write the
metadata to ``<area>/<qid>.json.tmp``, fsync it, rename it to ``<area>/<qid>.json``, fsync the
area. The metadata's appearance is the commit point, its removal (``remove``) the completion
point. So after a crash, data without metadata was never acknowledged or is already delivered
(deleted); metadata without data is damage, never a crash state (moved to ``corrupt/``).
Directory fsyncs are shared by concurrent callers (group commit, ``durable.DirSync``): each
caller returns only once an fsync that began after its own rename has finished.

Locking (``claim``): ``flock(LOCK_EX)`` on ``data/<qid>``, an inode that lives exactly as long as
the message is queued and is never rewritten or renamed while the metadata moves between areas
or is atomically replaced (a lock on the metadata file would be lost by each rewrite). Having
locked, the owner checks that the path still names the locked inode, then reads the metadata.
``update``/``move``/``remove`` require a claim held through this ``Spool`` object. ``commit``
holds the same lock on the data inode from before its rename until the metadata is durable, and
``recover`` takes it before touching a message, so recovery never races a commit, a delivery or
another worker. A commit may keep that lock (``keep_lock``) and hand it on as the message's
claim (``claimed``: the queue manager delivers a fresh commit without locking or reading it
again). The kernel drops the lock when its holder dies (kill -9 included). Locks belong to open
file descriptions: do not fork while holding a claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from gateway.durable import Defer, DirSync, Syncer, SyncSteps, fsync_dir, run_steps
from gateway.errors import SpoolError
from gateway.logs import event
from gateway.queue_entry import (
    _META,
    _PRECEDENCE,
    _TMP,
    QUEUE_AREAS,
    Area,
    QueueEntry,
    SpoolBusy,
    SpoolCorrupt,
    SpoolMissing,
    _check_area,
    _check_qid,
    is_qid,
)
from gateway.spares import SpareFiles

log = logging.getLogger("mailgate.spool")


@dataclass(frozen=True)
class RecoveryReport:
    incoming_removed: int = 0  # half-received DATA files
    temps_removed: int = 0  # half-written metadata rewrites
    requeued: int = 0  # active/ entries (in flight when we stopped) moved to deferred/
    corrupt: int = 0  # files moved to corrupt/
    orphans_removed: int = 0  # data without metadata: never acknowledged, or delivered
    busy: int = 0  # skipped: locked by a live process
    queued: int = 0  # valid entries left in active/deferred/hold
    spares_emptied: int = 0  # spare files a stop or crash left with content (gateway.spares)
    problems: tuple[str, ...] = ()  # one "path: reason" per file moved to corrupt/


def _lock_file(path: Path | str, *, block: bool) -> int:
    """Open ``path`` and flock it exclusively; returns the fd. FileNotFoundError when the path is
    gone (or now names another inode), BlockingIOError when locked and ``block`` is false."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _lock_fd(fd, path, block=block)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _lock_fd(fd: int, path: Path | str, *, block: bool) -> None:
    """flock the open file ``fd`` exclusively, checking that ``path`` still names it
    (FileNotFoundError if not, BlockingIOError when locked and ``block`` is false)."""
    fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    held, now = os.fstat(fd), os.stat(path)
    if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise FileNotFoundError(path)


def _unlink_missing_ok(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _free_name(directory: Path, name: str) -> Path:
    path, n = directory / name, 0
    while os.path.lexists(path):
        n += 1
        path = directory / f"{name}.{n}"
    return path


class _Joined(io.RawIOBase):
    """``head``, then the rest of ``f`` (closed with this)."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self._head, self._f = memoryview(head), f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._f.readinto(b)  # type: ignore[attr-defined]

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class Spool:
    """One spool directory; safe to share between threads and processes (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in ("incoming", *QUEUE_AREAS, "corrupt", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.spares = SpareFiles(self.root / "spare")  # inodes reused for new files
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        # concurrent commits, moves and removals share their directory fsyncs (group commit)
        self._dirsync = {sub: DirSync(self.root / sub) for sub in ("data", *QUEUE_AREAS)}
        # the directories as Paths and as "dir/" strings: a pathlib join costs microseconds,
        # and a message's way through the queue names its files a few dozen times
        self._dirs = {sub: self.root / sub for sub in ("incoming", "data", *QUEUE_AREAS)}
        self._prefix = {sub: f"{d}{os.sep}" for sub, d in self._dirs.items()}

    # -- paths ------------------------------------------------------------------------------
    def incoming_path(self, qid: str) -> Path:
        """Where DATA for ``qid`` streams in before ``commit``."""
        return self._dirs["incoming"] / f"{_check_qid(qid)}{_TMP}"

    def _data(self, qid: str) -> str:
        return self._prefix["data"] + _check_qid(qid)

    def _meta(self, area: Area, qid: str) -> str:
        return f"{self._prefix[area]}{_check_qid(qid)}{_META}"

    def _find(self, qid: str) -> Area | None:
        name = f"{_check_qid(qid)}{_META}"
        for area in QUEUE_AREAS:
            if os.path.lexists(self._prefix[area] + name):
                return area
        return None

    # -- commit -----------------------------------------------------------------------------
    def commit(self, entry: QueueEntry, data_path: Path, area: Area = "active", *,
               link: bool = False) -> None:
        """Make ``data_path`` (renamed, so on the spool's filesystem; with ``link`` hard-linked
        instead, and the caller removes its own name later) and ``entry`` durable in ``area``.
        When this returns the caller may answer 250; any failure is a SpoolError and leaves
        nothing of the message queued."""
        self._drive(self._commit_steps(entry, data_path, area, link, block=True))

    async def commit_async(self, entry: QueueEntry, data_path: Path, syncer: Syncer,
                           area: Area = "active", *, link: bool = False,
                           fd: int | None = None, keep_lock: bool = False) -> int | None:
        """``commit`` for the event loop: the loop makes the quick calls (open, link, rename,
        the metadata write) itself and only the fsyncs go to ``syncer``, which does those of
        all concurrent commits in one thread trip. Cancelled, it leaves nothing queued.
        ``fd``: the caller's own open descriptor of ``data_path`` (the DATA writer's, flushed),
        locked and fsync'd instead of a new one, unlocked again and left open: closed only
        after the fsync, the file's last close has nothing left to write back (ext4 starts
        the writeback of a file rewritten from size 0 at its close, on the loop). With
        ``keep_lock`` (and ``fd``) the lock is kept and a descriptor of its own is returned:
        the message's claim, held since before its metadata appeared, for ``claimed`` (None,
        the lock released, if no descriptor is to be had)."""
        keep = keep_lock and fd is not None
        await syncer.run(self._commit_steps(entry, data_path, area, link, block=False, fd=fd,
                                            keep_lock=keep), self.root)
        if not keep:
            return None
        assert fd is not None
        try:
            return os.dup(fd)  # one open file with ``fd``: the lock lasts until both close
        except OSError:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None

    def _commit_steps(self, entry: QueueEntry, data_path: Path, area: Area, link: bool, *,
                      block: bool, fd: int | None = None, keep_lock: bool = False
                      ) -> SyncSteps:
        """The commit protocol; yields each fsync it needs (see ``SyncSteps``)."""
        qid, area = entry.qid, _check_area(area)
        final = self._data(qid)
        own = fd is None
        try:
            if fd is None:
                fd = _lock_file(Path(data_path), block=block)
            else:
                _lock_fd(fd, data_path, block=block)
        except OSError as e:
            raise SpoolError(f"commit {qid}: cannot open {data_path}: {e}") from e
        renamed = done = False
        try:
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise SpoolError(f"commit {qid}: {data_path} holds {size} bytes, "
                                 f"entry says {entry.size}")
            if self._find(qid) is not None or os.path.lexists(final):
                raise SpoolError(f"commit {qid}: already queued")
            yield fd
            (os.link if link else os.rename)(data_path, final)
            renamed = True
            yield "data"
            yield from self._meta_steps(entry, area)
            done = True
        except BaseException as e:
            if renamed:  # we checked that no metadata existed: whatever is there is ours
                for leftover in (self._meta(area, qid), final):
                    try:  # each on its own: an unusable area must not keep the data file
                        _unlink_missing_ok(leftover)
                    except OSError as cleanup:
                        log.error("commit %s: cannot remove %s: %s", qid, leftover, cleanup)
            if isinstance(e, OSError):
                raise SpoolError(f"commit {qid}: {e}") from e
            raise
        finally:
            if own:
                os.close(fd)
            elif not (keep_lock and done):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _write_meta(self, entry: QueueEntry, area: Area) -> None:
        self._drive(self._meta_steps(entry, area))

    def _meta_steps(self, entry: QueueEntry, area: Area) -> SyncSteps:
        final = self._meta(area, entry.qid)
        tmp = final + _TMP
        payload = entry.to_json().encode("ascii")
        try:
            try:
                fd = self.spares.create(tmp)
            except FileExistsError:  # left by a crash (recovery removes those)
                os.unlink(tmp)
                fd = self.spares.create(tmp)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                yield fd
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            _unlink_missing_ok(tmp)
            raise
        yield area

    def _drive(self, steps: SyncSteps) -> None:
        """Run ``steps`` in this thread: each fsync at once (directories group-committed with
        concurrent callers, ``DirSync``); a failed one is raised into the steps."""
        def fsync(point: int | str) -> None:
            if isinstance(point, int):
                os.fsync(point)
            else:
                self._dirsync[point].sync()
        run_steps(steps, fsync)

    # -- reading ----------------------------------------------------------------------------
    def _read(self, area: Area, qid: str) -> QueueEntry:
        with open(self._meta(area, qid), "rb") as f:
            entry = QueueEntry.from_json(f.read())
        if entry.qid != qid:
            raise SpoolCorrupt(f"{area}/{qid}{_META} holds qid {entry.qid}")
        return entry

    def load(self, qid: str) -> tuple[Area, QueueEntry]:
        """The message's area and metadata. SpoolMissing if not queued, SpoolCorrupt if
        unreadable."""
        for _ in range(3):  # an unclaimed reader may race a move between areas
            area = self._find(qid)
            if area is None:
                break
            with contextlib.suppress(FileNotFoundError):
                return area, self._read(area, qid)
        raise SpoolMissing(f"{qid}: not queued")

    def _scan(self, *areas: Area, skip: frozenset[str] = frozenset()) -> Iterator[QueueEntry]:
        """Entries in qid (= arrival) order; temp files and ``skip`` skipped, unreadable ones
        logged and skipped (``recover`` moves them to corrupt/)."""
        names = sorted((n[:-len(_META)], area) for area in areas
                       for n in os.listdir(self.root / _check_area(area))
                       if n.endswith(_META) and n[:-len(_META)] not in skip)
        for qid, area in names:
            try:
                yield self._read(area, _check_qid(qid))
            except FileNotFoundError:
                continue
            except SpoolError as e:
                log.warning("spool: skipping unreadable %s/%s%s: %s", area, qid, _META, e)

    def entries(self, area: Area) -> Iterator[QueueEntry]:
        """The entries in ``area``, oldest first."""
        return self._scan(area)

    def due(self, now: float, limit: int, skip: frozenset[str] = frozenset()) -> list[str]:
        """Up to ``limit`` qids from active/ and deferred/ whose ``next_attempt`` <= ``now``,
        oldest (by arrival, i.e. qid order) first, leaving out ``skip`` (unread). Reads each
        other candidate's metadata."""
        due = (e.qid for e in self._scan("active", "deferred", skip=skip)
               if e.next_attempt <= now)
        return list(itertools.islice(due, max(limit, 0)))

    def open_data(self, qid: str) -> BinaryIO:
        """The message bytes as stored (without ``prepend``, with the ``skip`` bytes)."""
        try:
            return open(self._data(qid), "rb")
        except FileNotFoundError:
            raise SpoolMissing(f"{qid}: no data") from None

    def open_outgoing(self, entry: QueueEntry) -> BinaryIO:
        """The message as it is relayed: ``prepend``, then the data after its first ``skip``
        bytes."""
        f = self.open_data(entry.qid)
        try:
            f.seek(entry.skip)
        except BaseException:
            f.close()
            raise
        return io.BufferedReader(_Joined(entry.prepend, f))

    # -- ownership and changes --------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, qid: str, *, wait: bool = False) -> Iterator[tuple[Area, QueueEntry]]:
        """Own ``qid`` exclusively (across processes) for the ``with`` block; yields its area and
        metadata as read under the lock. SpoolBusy if another owner holds it (or, with ``wait``,
        blocks until released), SpoolMissing if it is no longer queued."""
        with self._held_here(qid):
            try:
                fd = _lock_file(self._data(qid), block=wait)
            except FileNotFoundError:
                raise SpoolMissing(f"{qid}: not queued") from None
            except BlockingIOError:
                raise SpoolBusy(f"{qid}: claimed by another process") from None
            try:
                yield self.load(qid)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def claimed(self, qid: str, fd: int, entry: QueueEntry, area: Area = "active"
                ) -> Iterator[tuple[Area, QueueEntry]]:
        """``claim`` for a message this process committed with ``keep_lock``: ``fd`` (its own
        descriptor, closed at the end of the block) has held the lock since before the
        metadata appeared, so nobody else can have changed it and ``entry`` is what is on
        disk: no lock to take, nothing to read. SpoolBusy if claimed here already."""
        with contextlib.ExitStack() as stack:
            stack.callback(os.close, fd)  # whatever happens, last
            stack.enter_context(self._held_here(qid))
            yield area, entry

    @contextlib.contextmanager
    def _held_here(self, qid: str) -> Iterator[None]:
        """``qid`` is claimed through this object for the block (SpoolBusy if it already is)."""
        _check_qid(qid)
        with self._held_lock:
            if qid in self._held:
                raise SpoolBusy(f"{qid}: already claimed in this process")
            self._held.add(qid)
        try:
            yield
        finally:
            with self._held_lock:
                self._held.discard(qid)

    def _require_claim(self, qid: str) -> None:
        with self._held_lock:
            if _check_qid(qid) not in self._held:
                raise SpoolError(f"{qid}: change without a claim")

    def update(self, entry: QueueEntry, area: Area) -> None:
        """Atomically rewrite the metadata of a claimed message where it is (``area``)."""
        self._require_claim(entry.qid)
        if not os.path.lexists(self._meta(_check_area(area), entry.qid)):
            raise SpoolMissing(f"{entry.qid}: not in {area}/")
        self._write_meta(entry, area)

    def move(self, qid: str, src: Area, dst: Area) -> None:
        """Move a claimed message's metadata from ``src`` to ``dst`` (rename, both dirs fsync'd)."""
        self._require_claim(qid)
        source, target = self._meta(_check_area(src), qid), self._meta(_check_area(dst), qid)
        if src == dst:
            return
        if os.path.lexists(target):
            raise SpoolError(f"{qid}: already in {dst}/")
        try:
            os.rename(source, target)
        except FileNotFoundError:
            raise SpoolMissing(f"{qid}: not in {src}/") from None
        self._dirsync[dst].sync()
        self._dirsync[src].sync()

    def remove(self, qid: str) -> None:
        """Delete a claimed, finished message. Metadata first: a crash in between leaves data
        without metadata, which ``recover`` rightly deletes (the message is done). The other
        order would leave metadata without data, indistinguishable from damage, which recovery
        must treat as corrupt. The area is fsync'd so a power cut does not resurrect the
        message (a redelivery); the data's unlink needs no fsync (an orphan is cleaned up)."""
        self._drive(self._remove_steps(qid))

    async def remove_async(self, qid: str, syncer: Syncer) -> None:
        """``remove`` on the event loop, the area's fsync batched by ``syncer``, and the
        files emptied for reuse in its thread (``SpareFiles.discard``)."""
        await syncer.run(self._remove_steps(qid, syncer.defer), self.root)

    def _remove_steps(self, qid: str, defer: Defer | None = None) -> SyncSteps:
        self._require_claim(qid)
        area = self._find(qid)
        if area is None:
            raise SpoolMissing(f"{qid}: not queued")
        self.spares.discard(self._meta(area, qid), defer=defer)
        yield area
        self.spares.discard(self._data(qid), missing_ok=True, defer=defer)

    # -- free space -------------------------------------------------------------------------
    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def has_room(self, min_free_bytes: int) -> bool:
        """False when MAIL should get 452 4.3.1 (see ``min_free_bytes``)."""
        return self.free_bytes() >= min_free_bytes

    # -- recovery ---------------------------------------------------------------------------
    def recover(self, now: float | None = None, *,
                incoming_min_age_s: float = 0.0) -> RecoveryReport:
        """Startup: make the spool consistent (see the module doc). Safe beside live workers and
        committers (it skips what they lock); ``incoming_min_age_s`` spares DATA files that a
        live receiver in another process may still be writing (0 at single-process start)."""
        now = time.time() if now is None else now
        counts: Counter[str] = Counter()
        problems: list[str] = []
        self._recover_incoming(incoming_min_age_s, counts)
        for area in _PRECEDENCE:
            for name in sorted(os.listdir(self.root / area)):
                try:
                    self._recover_meta(area, name, now, counts, problems)
                except FileNotFoundError:  # moved or removed by a live process meanwhile
                    continue
        for name in sorted(os.listdir(self.root / "data")):
            with contextlib.suppress(FileNotFoundError):
                self._recover_data(name, counts, problems)
        counts["spares"] = self.spares.empty_leftovers()
        report = RecoveryReport(
            incoming_removed=counts["incoming"], temps_removed=counts["temps"],
            requeued=counts["requeued"], corrupt=len(problems),
            orphans_removed=counts["orphans"], busy=counts["busy"], queued=counts["queued"],
            spares_emptied=counts["spares"], problems=tuple(problems))
        event(log, "spool-recovered", root=str(self.root),
              **{k: v for k, v in vars(report).items() if k != "problems"})
        return report

    def _recover_incoming(self, min_age_s: float, counts: Counter[str]) -> None:
        older_than = time.time() - min_age_s
        for path in sorted((self.root / "incoming").iterdir()):
            try:  # commit holds this lock while it renames the file into data/
                if not path.is_file() or (min_age_s > 0 and path.stat().st_mtime > older_than):
                    continue
                fd = _lock_file(path, block=False)
            except BlockingIOError:
                counts["busy"] += 1
                continue
            except FileNotFoundError:
                continue
            try:
                path.unlink()
                counts["incoming"] += 1
            finally:
                os.close(fd)

    def _lock_qid(self, qid: str, counts: Counter[str]) -> int | None:
        """The message lock's fd; -1 if there is no data file; None if busy (counted)."""
        try:
            return _lock_file(self._data(qid), block=False)
        except FileNotFoundError:
            return -1
        except BlockingIOError:
            counts["busy"] += 1
            return None

    def _recover_meta(self, area: Area, name: str, now: float, counts: Counter[str],
                      problems: list[str]) -> None:
        path = self.root / area / name
        if name.endswith(_TMP):  # a killed write, unless its writer still holds the lock
            qid = name[:-len(_META + _TMP)]
            fd = self._lock_qid(qid, counts) if is_qid(qid) else -1
            if fd is None:
                return
            try:
                path.unlink()
                counts["temps"] += 1
            finally:
                if fd >= 0:
                    os.close(fd)
            return
        qid = name[:-len(_META)] if name.endswith(_META) else ""
        if not is_qid(qid) or not path.is_file():
            self._to_corrupt(path, None, "unexpected file in a queue area", problems)
            return
        fd = self._lock_qid(qid, counts)
        if fd is None:
            return
        if fd < 0:  # commit writes the data first: this is damage, not a crash state
            self._to_corrupt(path, None, "metadata without data", problems)
            return
        try:
            winner = next((a for a in _PRECEDENCE if os.path.lexists(self._meta(a, qid))), area)
            if winner != area:
                self._to_corrupt(path, None, f"duplicate of {winner}/{name}", problems)
                return
            try:
                entry = self._read(area, qid)
                size = os.fstat(fd).st_size
                if size != entry.size:
                    raise SpoolCorrupt(f"data has {size} bytes, metadata says {entry.size}")
            except SpoolCorrupt as e:
                self._to_corrupt(path, qid, str(e), problems)
                return
            if area == "active":  # was (or might have been) in flight: retry it now
                self._write_meta(replace(entry, next_attempt=now), area)
                os.rename(path, self._meta("deferred", qid))
                fsync_dir(self.root / "deferred")
                fsync_dir(self.root / area)
                counts["requeued"] += 1
            counts["queued"] += 1
        finally:
            os.close(fd)

    def _recover_data(self, name: str, counts: Counter[str], problems: list[str]) -> None:
        path = self.root / "data" / name
        if not is_qid(name) or not path.is_file():
            self._to_corrupt(path, None, "unexpected file in data/", problems)
            return
        if self._find(name) is not None:
            return
        fd = self._lock_qid(name, counts)
        if fd is None or fd < 0:
            return  # a commit in progress, or gone meanwhile
        try:
            if self._find(name) is None:  # still none under the lock: never acked, or done
                path.unlink()
                counts["orphans"] += 1
        finally:
            os.close(fd)

    def set_aside(self, qid: str, reason: str) -> str:
        """An unreadable entry an operator deletes: its metadata (and data) go to corrupt/,
        as recovery would move them, with a .reason file; returns where ("corrupt/NAME").
        SpoolMissing if it is in no area."""
        area = self._find(qid)
        if area is None:
            raise SpoolMissing(f"{qid}: not in the queue")
        target = self._to_corrupt(Path(self._meta(area, qid)), qid, reason, [])
        return str(target.relative_to(self.root))

    def _to_corrupt(self, path: Path, qid: str | None, reason: str,
                    problems: list[str]) -> Path:
        """Move ``path`` (and ``data/<qid>`` when given) to corrupt/, with a .reason file;
        returns where it went."""
        corrupt = self.root / "corrupt"
        target = _free_name(corrupt, path.name)
        note = {"time": time.time(), "from": str(path.relative_to(self.root)), "reason": reason}
        data_target = None
        if qid is not None and os.path.lexists(self._data(qid)):
            data_target = _free_name(corrupt, f"{qid}.data")
            note["data"] = data_target.name
        reason_path = _free_name(corrupt, target.name + ".reason")
        fd = os.open(reason_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(note) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if data_target is not None and qid is not None:  # data first: data/ never keeps it
            os.rename(self._data(qid), data_target)
        os.rename(path, target)
        fsync_dir(corrupt)
        fsync_dir(self.root / "data")
        fsync_dir(path.parent)
        problems.append(f"{note['from']}: {reason}")
        event(log, "spool-corrupt", level=logging.ERROR, file=note["from"], reason=reason,
              moved_to=str(target.relative_to(self.root)), data=note.get("data"))
        return target
