"""The quarantine: messages the policy quarantined, kept in the spool's ``hold/`` area (never
delivered) and indexed in SQLite (``spool/quarantine.db``), until an operator releases them to
the queue or deletes them, or they expire. Blocking by design: the gateway calls it through
``asyncio.to_thread``; ``gateway/quarantinecli.py`` is the operator's command.

A quarantined message is an ordinary queue entry (``gateway.queue_entry.QueueEntry``): the
message bytes exactly as they would have been relayed (our headers included) in
``spool/data/QID``, and its metadata in ``spool/hold/QID.json`` — the envelope (sender, the
recipients with their DSN parameters, MAIL parameters, ENVID/RET), the client, and in
``decision``: ``action = "quarantine"``, ``score``, ``by`` (the rule, threshold or filter that
chose it), ``class``, ``symbols`` (names) and ``symbol_details`` (``[name, score, options]``),
``quarantined_at``. That file is committed like any queue entry (fsync + rename) before the
client gets its 250, so the quarantine survives a crash exactly as the queue does, and the
queue manager never picks it (hold/ is never due).

The SQLite index (one row per message, a row per recipient) is what ``list`` filters on. It is
written just before the commit and is always rebuildable from ``hold/`` (``sync``): a row whose
message is gone is dropped, a quarantined message without a row gets one. Releasing moves the
entry hold/ -> active/ with a fresh arrival time (so ``queue.max_lifetime_s`` counts from the
release): the queue manager then delivers it to the original recipients like any queued mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import supervise
from gateway.errors import SpoolError
from gateway.logs import event
from gateway.policy.schema import QuarantineConfig
from gateway.queue_entry import QueueEntry, SpoolBusy, SpoolCorrupt, SpoolMissing, is_qid
from gateway.spool import Spool

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("mailgate.quarantine")
ACTION = "quarantine"
DB_NAME = "quarantine.db"
SCHEMA_VERSION = 1
SYNC_GRACE_S = 60.0  # a row this young without its message may be a commit in progress
HEADER_CAP = 64 * 1024  # bytes of the header block read for Subject and Message-ID
DB_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    qid TEXT PRIMARY KEY,
    quarantined_at REAL NOT NULL,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    score REAL NOT NULL,
    reason TEXT NOT NULL,
    policy_class TEXT NOT NULL,
    symbols TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    helo TEXT NOT NULL,
    subject TEXT,
    message_id TEXT
);
CREATE INDEX IF NOT EXISTS messages_time ON messages (quarantined_at);
CREATE TABLE IF NOT EXISTS recipients (
    qid TEXT NOT NULL REFERENCES messages (qid) ON DELETE CASCADE,
    addr TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_qid ON recipients (qid);
CREATE INDEX IF NOT EXISTS recipients_addr ON recipients (addr);
"""


class QuarantineError(SpoolError):
    """The quarantine index cannot be used, or a message is not in the quarantine."""


class NotQuarantined(QuarantineError):
    """The queue ID names no quarantined message (never, released, deleted or expired)."""


@dataclass(frozen=True)
class SymbolInfo:
    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    """One quarantined message as the index has it."""

    qid: str
    quarantined_at: float
    sender: str
    recipients: tuple[str, ...]
    size: int
    score: float
    reason: str  # Decision.by
    policy_class: str
    symbols: tuple[SymbolInfo, ...]
    client_ip: str
    helo: str
    subject: str | None
    message_id: str | None

    def to_obj(self) -> dict[str, Any]:
        obj = dict(vars(self))
        obj["recipients"] = list(self.recipients)
        obj["symbols"] = [{"name": s.name, "score": s.score, "options": list(s.options)}
                          for s in self.symbols]
        return obj


def decision(action: str, score: float, by: str, policy_class: str,
             symbols: list[SymbolInfo], now: float) -> dict[str, Any]:
    """The ``decision`` of a quarantined queue entry (see the module doc)."""
    return {"action": action, "score": score, "by": by, "class": policy_class,
            "symbols": [s.name for s in symbols],
            "symbol_details": [[s.name, s.score, list(s.options)] for s in symbols],
            "quarantined_at": now}


def is_quarantined(entry: QueueEntry) -> bool:
    return entry.decision.get("action") == ACTION


def _header_fields(head: bytes) -> tuple[str | None, str | None]:
    """Subject (decoded, one line) and Message-ID from the start of a message."""
    end = head.find(b"\r\n\r\n")
    block = head[:end + 2] if end >= 0 else head
    try:
        msg = BytesHeaderParser(policy=default_policy).parsebytes(block)
        subject, mid = msg.get("Subject"), msg.get("Message-ID")
        return (" ".join(str(subject).split())[:998] if subject is not None else None,
                str(mid).strip()[:998] if mid is not None else None)
    except Exception:  # a malformed header is no reason to lose the message
        return None, None


def record_of(entry: QueueEntry, head: bytes) -> Record:
    """The index row of a quarantined entry; ``head``: the start of its message bytes."""
    d = entry.decision
    details = []
    for item in d.get("symbol_details") or ():
        with contextlib.suppress(TypeError, ValueError):
            name, score, options = item
            details.append(SymbolInfo(str(name), float(score), tuple(map(str, options))))
    subject, mid = _header_fields(head)
    return Record(
        qid=entry.qid, quarantined_at=float(d.get("quarantined_at", entry.arrival)),
        sender=entry.sender, recipients=tuple(r.addr for r in entry.recipients),
        size=entry.size, score=float(d.get("score", 0.0)), reason=str(d.get("by", "")),
        policy_class=str(d.get("class", "default")), symbols=tuple(details),
        client_ip=entry.client_ip, helo=entry.helo, subject=subject, message_id=mid)


def _like(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Quarantine:
    """The quarantine of one spool. Cheap to make; the database is opened per operation, so an
    instance may be shared between threads and several processes may use the same spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.db_path = spool.root / DB_NAME

    # -- the index --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        import sqlite3  # here, not at start: ~1.3 MB per process, used only when quarantining
        try:
            try:
                db = self._open()
            except sqlite3.OperationalError:  # locked, unwritable, full: not the file's content
                raise
            except sqlite3.DatabaseError as e:  # "file is not a database", "malformed"
                if not self._set_aside(e):
                    raise
                db = self._open()  # a new index, rebuilt from hold/ by the next sync
        except sqlite3.Error as e:
            raise QuarantineError(f"quarantine index {self.db_path}: {e}") from None
        try:
            yield db
        except sqlite3.Error as e:
            raise QuarantineError(f"quarantine index {self.db_path}: {e}") from None
        finally:
            db.close()

    def _open(self) -> sqlite3.Connection:
        import sqlite3

        db = sqlite3.connect(self.db_path, timeout=DB_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # new (or deleted)
                db.execute("PRAGMA journal_mode = WAL")
                db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self, error: Exception) -> bool:
        """The index file is not an SQLite database at all (overwritten, truncated by a disk
        fault): rename it to ``quarantine.db.corrupt`` (one error line) so that a new one is
        made and rebuilt from hold/, instead of every quarantined message getting 451 and
        every ``mailgate quarantine`` command failing. True: open it again (also when the
        file is now a database: another process set the bad one aside first); False: the
        file cannot be read (a directory, say)."""
        try:
            with open(self.db_path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if head == b"SQLite format 3\x00":
            return True
        aside = self.db_path.with_name(DB_NAME + ".corrupt")
        try:
            os.replace(self.db_path, aside)
        except FileNotFoundError:  # another process set it aside first
            return True
        for suffix in ("-wal", "-shm"):  # the old file's journal, if any
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.db_path}{suffix}")
        event(log, "quarantine-index-corrupt", level=logging.ERROR, file=str(self.db_path),
              reason=str(error), moved_to=str(aside), rebuilt_from="hold/")
        return True

    def _index(self, db: sqlite3.Connection, r: Record) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM messages WHERE qid = ?", (r.qid,))
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.qid, r.quarantined_at, r.sender, r.size, r.score, r.reason, r.policy_class,
                 json.dumps(r.to_obj()["symbols"]), r.client_ip, r.helo, r.subject,
                 r.message_id))
            db.executemany("INSERT INTO recipients VALUES (?, ?)",
                           [(r.qid, a.lower()) for a in dict.fromkeys(r.recipients)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _unindex(self, qid: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM messages WHERE qid = ?", (qid,))

    # -- storing ----------------------------------------------------------------------------
    def store(self, entry: QueueEntry, data_path: Path) -> None:
        """Quarantine ``entry`` (its ``decision`` made by ``decision``) with the message bytes
        in ``data_path`` (on the spool's filesystem; renamed away). When this returns the
        message is durable and the caller may answer 250; on any error (QuarantineError,
        SpoolError, OSError) nothing of it is kept."""
        if not is_quarantined(entry):
            raise QuarantineError(f"{entry.qid}: decision.action is not {ACTION!r}")
        with open(data_path, "rb") as f:
            record = record_of(entry, f.read(HEADER_CAP))
        with self._db() as db:
            self._index(db, record)
        try:
            self.spool.commit(entry, data_path, "hold")
        except BaseException:
            with contextlib.suppress(QuarantineError):
                self._unindex(entry.qid)
            raise
        event(log, "quarantine", qid=entry.qid, sender=entry.sender or "<>",
              rcpts=list(record.recipients), size=entry.size, score=record.score,
              by=record.reason, policy_class=record.policy_class,
              symbols=[s.name for s in record.symbols])

    # -- reading ----------------------------------------------------------------------------
    def _held(self, qid: str) -> bool:
        return os.path.lexists(self.spool.root / "hold" / f"{qid}.json")

    def sync(self, now: float | None = None) -> tuple[int, int]:
        """Make the index match hold/: index quarantined messages it lacks, drop rows whose
        message is gone (released or deleted by ``mailgate queue``, say). Returns (added,
        dropped)."""
        now = time.time() if now is None else now
        held = {n[:-5] for n in os.listdir(self.spool.root / "hold")
                if n.endswith(".json") and is_qid(n[:-5])}
        with self._db() as db:
            rows = db.execute("SELECT qid, quarantined_at FROM messages").fetchall()
        indexed = {q for q, _ in rows}
        gone = [q for q, t in rows if q not in held and t < now - SYNC_GRACE_S
                and not self._held(q)]
        added = 0
        for qid in sorted(held - indexed):
            try:
                area, entry = self.spool.load(qid)
                if area != "hold" or not is_quarantined(entry):
                    continue
                with self.spool.open_data(qid) as f:
                    record = record_of(entry, f.read(HEADER_CAP))
            except SpoolError:
                continue
            with self._db() as db:
                self._index(db, record)
            added += 1
        if gone:
            with self._db() as db:
                db.executemany("DELETE FROM messages WHERE qid = ?", [(q,) for q in gone])
        return added, len(gone)

    def _records(self, where: str, params: list[Any], limit: int | None = None
                 ) -> list[Record]:
        sql = f"SELECT * FROM messages {where} ORDER BY quarantined_at, qid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out = []
        with self._db() as db:
            for row in db.execute(sql, params).fetchall():
                rcpts = tuple(a for (a,) in db.execute(
                    "SELECT addr FROM recipients WHERE qid = ? ORDER BY rowid", (row[0],)))
                symbols = tuple(SymbolInfo(s["name"], s["score"], tuple(s["options"]))
                                for s in json.loads(row[7]))
                out.append(Record(row[0], row[1], row[2], rcpts, row[3], row[4], row[5],
                                  row[6], symbols, row[8], row[9], row[10], row[11]))
        return [r for r in out if self._held(r.qid)]  # a commit in progress, or one undone

    def find(self, *, since: float | None = None, sender: str | None = None,
             rcpt: str | None = None, limit: int | None = None) -> list[Record]:
        """Quarantined messages, oldest first; ``sender``/``rcpt``: case-insensitive
        substrings of the sender / of any recipient."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("quarantined_at >= ?")
            params.append(since)
        if sender is not None:
            where.append("lower(sender) LIKE ? ESCAPE '\\'")
            params.append(_like(sender))
        if rcpt is not None:
            where.append("qid IN (SELECT qid FROM recipients WHERE addr LIKE ? ESCAPE '\\')")
            params.append(_like(rcpt))
        return self._records("WHERE " + " AND ".join(where) if where else "", params, limit)

    def get(self, qid: str) -> tuple[Record, QueueEntry]:
        """The index row and the stored entry; NotQuarantined if there is none."""
        try:
            area, entry = self.spool.load(qid)
        except SpoolMissing:
            raise NotQuarantined(f"{qid}: not in the quarantine") from None
        if area != "hold" or not is_quarantined(entry):
            raise NotQuarantined(f"{qid}: not in the quarantine (a queued message, in {area}/)")
        rows = self._records("WHERE qid = ?", [qid])
        if rows:
            return rows[0], entry
        with self.spool.open_data(qid) as f:
            return record_of(entry, f.read(HEADER_CAP)), entry

    def message(self, qid: str) -> bytes:
        with self.spool.open_data(qid) as f:
            return f.read()

    # -- changes ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _claimed(self, qid: str, wait: bool) -> Iterator[QueueEntry]:
        """Claim a quarantined message (SpoolBusy if another process holds it)."""
        try:
            with self.spool.claim(qid, wait=wait) as (area, entry):
                if area != "hold" or not is_quarantined(entry):
                    raise NotQuarantined(f"{qid}: not in the quarantine (in {area}/)")
                yield entry
        except SpoolMissing:
            with contextlib.suppress(QuarantineError):
                self._unindex(qid)
            raise NotQuarantined(f"{qid}: not in the quarantine") from None

    def release(self, qid: str, *, wait: bool = False, by: str = "") -> QueueEntry:
        """Move the message to the queue (hold/ -> active/) for delivery to its original
        recipients; returns the released entry."""
        with self._claimed(qid, wait) as entry:
            now = time.time()
            released = replace(entry, arrival=now, next_attempt=now, decision={
                **entry.decision, "released_at": now, "original_arrival": entry.arrival})
            self.spool.update(released, "hold")
            self.spool.move(qid, "hold", "active")
        with contextlib.suppress(QuarantineError):
            self._unindex(qid)
        self._log("quarantine-release", entry, by)
        return released

    def delete(self, qid: str, *, wait: bool = False, by: str = "") -> QueueEntry:
        with self._claimed(qid, wait) as entry:
            self.spool.remove(qid)
        with contextlib.suppress(QuarantineError):
            self._unindex(qid)
        self._log("quarantine-delete", entry, by)
        return entry

    def expire(self, retention_s: float, now: float | None = None, *, by: str = "gateway"
               ) -> list[str]:
        """Delete what was quarantined more than ``retention_s`` ago; returns their qids.
        Messages busy in another process are left for the next run."""
        now = time.time() if now is None else now
        self.sync(now)
        with self._db() as db:
            old = [q for (q,) in db.execute(
                "SELECT qid FROM messages WHERE quarantined_at < ? ORDER BY quarantined_at",
                (now - retention_s,))]
        done = []
        for qid in old:
            try:
                with self._claimed(qid, False) as entry:
                    self.spool.remove(qid)
            except (NotQuarantined, SpoolBusy):
                continue
            except SpoolCorrupt as e:  # kept (the next start moves it to corrupt/); the
                # others still expire: the pass used to end here, every time
                event(log, "quarantine-unreadable", level=logging.WARNING, qid=qid,
                      reason=str(e), kept=f"hold/{qid}.json")
                continue
            with contextlib.suppress(QuarantineError):
                self._unindex(qid)
            self._log("quarantine-expire", entry, by, age_s=round(now - float(
                entry.decision.get("quarantined_at", entry.arrival)), 1))
            done.append(qid)
        return done

    def _log(self, name: str, entry: QueueEntry, by: str, **extra: Any) -> None:
        d: Mapping[str, Any] = entry.decision
        event(log, name, qid=entry.qid, sender=entry.sender or "<>",
              rcpts=[r.addr for r in entry.recipients], size=entry.size,
              score=d.get("score"), reason=d.get("by"), by=by or None, **extra)


EXPIRY_TASK = "quarantine-expiry"  # its name in supervise.FAILURES


async def expire_loop(spool: Spool, config: Callable[[], QuarantineConfig]) -> None:
    """The running gateway's automatic expiry: every ``expire_interval_s`` (of the policy in
    force, reloads included), delete what is older than ``retention_s``. A failed pass is
    reported (``supervise.report``: logged, counted) and tried again at the next interval;
    the gateway runs this loop supervised (``supervise.start``), so anything else that
    escapes it starts it again."""
    q = Quarantine(spool)
    while True:
        cfg = config()
        try:
            async with asyncio.timeout(max(60.0, cfg.expire_interval_s)):
                await asyncio.to_thread(q.expire, cfg.retention_s)
            supervise.succeeded(EXPIRY_TASK)
        except Exception as e:
            supervise.report(EXPIRY_TASK, e, context=f"a pass; the next in "
                                                     f"{cfg.expire_interval_s:g}s")
        await asyncio.sleep(cfg.expire_interval_s)
