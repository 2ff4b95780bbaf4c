"""The Bayes token store: per-token spam/ham counts, the message totals and the signatures of
learned messages, in an embedded SQLite file (stdlib ``sqlite3``, WAL mode).

The interface (:class:`BayesStore`) is small so that a Redis store can implement it later:
``snapshot(ids)`` for classification (totals and counts read in one consistent snapshot) and
``apply(changes)`` for learning (a batch of learn/forget changes in one transaction, so a
reader never sees half a message or a total that does not match the counts).

Schema: ``tokens(token INTEGER PRIMARY KEY, spam, ham, atime)`` — tokens are 64-bit hashes
(``_tokenizer.token_id``), atime the day (Unix days) the token was last learned;
``seen(msgkey TEXT PRIMARY KEY, class)`` — class ``'s'`` or ``'h'``;
``totals(id = 0, nspam, nham)``.

Readers (the filter, in each worker process) open the file with ``query_only`` and one
connection per thread; the writer is ``mailgate learn``. WAL lets them run at the same time.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

Outcome = Literal["learned", "known", "relearned", "forgotten", "unknown"]
Klass = Literal["spam", "ham"]
_UNINITIALISED = ("no such table: totals", "no such table: tokens")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token INTEGER PRIMARY KEY, spam INTEGER NOT NULL DEFAULT 0,
                                   ham INTEGER NOT NULL DEFAULT 0, atime INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen (msgkey TEXT PRIMARY KEY, class TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0),
                                   nspam INTEGER NOT NULL, nham INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
"""


@dataclass(frozen=True, slots=True)
class Change:
    """Learn ``tokens`` of message ``key`` as ``klass``; ``klass=None`` forgets it."""

    key: str
    klass: Klass | None
    tokens: Sequence[int]
    only_new: bool = False  # auto-learn: a message already learned (either way) stays as is


@dataclass(frozen=True, slots=True)
class Snapshot:
    nspam: int
    nham: int
    counts: dict[int, tuple[int, int]]  # token -> (spam, ham), only tokens seen in training


class BayesStore(Protocol):
    def snapshot(self, tokens: Sequence[int]) -> Snapshot: ...

    def apply(self, changes: Sequence[Change]) -> list[Outcome]: ...

    def close(self) -> None: ...


class SqliteReader:
    """Read side, shared by the filter's threads (one connection per thread). A missing file
    reads as an empty store (nothing learned yet); it is opened once it appears."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection | None:
        """This thread's connection; reopened when the file was replaced (deleted and learned
        anew), None while there is no file."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        ident = (st.st_dev, st.st_ino, st.st_ctime_ns)  # ctime: an inode number may be reused
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "ident", ident) != ident:
            conn.close()
            conn = None
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            self._local.ident = ident
            with self._lock:
                self._all.append(conn)
        return conn

    def snapshot(self, tokens: Sequence[int]) -> Snapshot:
        conn = self._conn()
        if conn is None:
            return Snapshot(0, 0, {})
        conn.execute("BEGIN")  # one read transaction: totals and counts from one snapshot
        try:
            row = conn.execute("SELECT nspam, nham FROM totals WHERE id = 0").fetchone()
            counts = _counts(conn, tokens)
        except sqlite3.OperationalError as e:
            if str(e) not in _UNINITIALISED:
                raise
            return Snapshot(0, 0, {})  # created but not yet initialised by `mailgate learn`
        finally:
            conn.execute("COMMIT")
        return Snapshot(row[0], row[1], counts) if row else Snapshot(0, 0, {})

    def apply(self, changes: Sequence[Change]) -> list[Outcome]:
        raise TypeError("the filter's store is read-only; learn with `mailgate learn`")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


def _counts(conn: sqlite3.Connection, tokens: Sequence[int]) -> dict[int, tuple[int, int]]:
    # One statement for any number of tokens: they go in as one JSON array, which SQLite's
    # json_each (built in since 3.38) turns into rows to join on the primary key. An
    # ``IN (?, …)`` list needs a statement per list length, and the connection caches each
    # compiled one: up to 128 per connection (one per classifying thread), 18 MB for 128 of
    # 773 to 900 values (measured), the lengths a message's last chunk of tokens takes.
    # A list of ints prints as a JSON array: 265 µs for a 64 KiB message's 3,584 ids against
    # 400 for a join of their strs.
    return {token: (spam, ham) for token, spam, ham in conn.execute(_COUNTS, (
        str(list(tokens)),))}


_COUNTS = ("SELECT t.token, t.spam, t.ham FROM json_each(?) AS j "
           "JOIN tokens AS t ON t.token = j.value")
_JSON_PROBE = "SELECT value FROM json_each('[1]')"


def json_each_missing() -> str | None:
    """None when this Python's SQLite has ``json_each``, which the lookups need; else why."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        try:
            conn.execute(_JSON_PROBE).fetchall()
        except sqlite3.OperationalError as e:
            return (f"this Python's SQLite ({sqlite3.sqlite_version}) has no json_each ({e}); "
                    "Bayes needs SQLite 3.38 or later, or one built with JSON1")
    return None


class SqliteStore(SqliteReader):
    """Read and write (``mailgate learn``): creates the file and schema when missing."""

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        super().__init__(path, busy_timeout_s)
        self._w = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
        self._w.execute("PRAGMA journal_mode = WAL")
        self._w.execute("PRAGMA synchronous = NORMAL")
        self._w.executescript(_SCHEMA)
        self._local.conn = self._w
        st = path.stat()
        self._local.ident = (st.st_dev, st.st_ino, st.st_ctime_ns)

    def apply(self, changes: Sequence[Change]) -> list[Outcome]:
        """Apply a batch in one transaction; one outcome per change."""
        c = self._w
        day = int(time.time() // 86400)
        outcomes: list[Outcome] = []
        c.execute("BEGIN IMMEDIATE")
        try:
            for ch in changes:
                row = c.execute("SELECT class FROM seen WHERE msgkey = ?", (ch.key,)).fetchone()
                old: Klass | None = None if row is None else ("spam" if row[0] == "s" else "ham")
                if ch.klass is None:
                    if old is None:
                        outcomes.append("unknown")
                        continue
                    _add(c, ch.tokens, old, -1, day)
                    c.execute("DELETE FROM seen WHERE msgkey = ?", (ch.key,))
                    outcomes.append("forgotten")
                elif old == ch.klass or (old is not None and ch.only_new):
                    outcomes.append("known")
                else:
                    if old is not None:
                        _add(c, ch.tokens, old, -1, day)
                    _add(c, ch.tokens, ch.klass, +1, day)
                    c.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)",
                              (ch.key, ch.klass[0]))
                    outcomes.append("learned" if old is None else "relearned")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        return outcomes

    def close(self) -> None:
        super().close()
        self._w.close()


def _add(c: sqlite3.Connection, tokens: Iterable[int], klass: Klass, delta: int,
         day: int) -> None:
    col = "spam" if klass == "spam" else "ham"
    tok = list(tokens)
    if delta > 0:
        c.executemany(f"INSERT INTO tokens (token, {col}, atime) VALUES (?, 1, ?) "
                      f"ON CONFLICT(token) DO UPDATE SET {col} = {col} + 1, atime = ?",
                      ((t, day, day) for t in tok))
    else:  # never below zero (the tokenizer may have changed since the message was learned)
        c.executemany(f"UPDATE tokens SET {col} = MAX({col} - 1, 0) WHERE token = ?",
                      ((t,) for t in tok))
        c.executemany("DELETE FROM tokens WHERE token = ? AND spam = 0 AND ham = 0",
                      ((t,) for t in tok))
    tot = "nspam" if klass == "spam" else "nham"
    c.execute(f"UPDATE totals SET {tot} = MAX({tot} + ?, 0) WHERE id = 0", (delta,))
