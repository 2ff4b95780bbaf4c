"""``mailgate learn``: train the Bayes filter's token store from message files, Maildir folders
and mbox files (``--spam``, ``--ham``), or unlearn messages (``--forget``).

The store and the tokenizer settings come from the ``bayes`` filter of the policy (``--policy``)
or, with ``--db``, the given file and default settings. After the summary, while the store holds
fewer than the filter's ``min_spam`` spam or ``min_ham`` ham messages, a second line says that
Bayes stays inactive until then, with the counts. Each message is identified by its
signature (``filters._tokenizer.message_key``): learning a message again as the same class is
skipped, as the other class moves it. Changes are written in batches, one transaction each.

Exit codes (as for every ``mailgate`` command): 0 ok; 1 some messages could not be read or
parsed (the rest was learned), or the policy, the store or a PATH is unusable (nothing learned);
2 bad usage (the command line).
"""

from __future__ import annotations

import argparse
import mailbox
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from filters._tokenizer import TokenizerConfig

EXIT_OK, EXIT_ERRORS = 0, 1
BATCH = 200


def add_arguments(p: argparse.ArgumentParser, policy_help: str) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--spam", action="store_const", const="spam", dest="klass",
                      help="learn the messages as spam")
    what.add_argument("--ham", action="store_const", const="ham", dest="klass",
                      help="learn the messages as ham (not spam)")
    what.add_argument("--forget", action="store_const", const="forget", dest="klass",
                      help="unlearn the messages")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--policy", type=Path, default=None,
                       help=f"policy whose bayes filter names the store and settings "
                       f"({policy_help})")
    where.add_argument("--db", type=Path, help="the token store file (default settings)")
    p.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                   help="without a terminal: seconds between progress lines (default 5)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="message file (.eml), Maildir folder, mbox file or directory")


class SetupError(Exception):
    """Exit 1: the policy, the store or a PATH cannot be used."""


def _settings(args: argparse.Namespace) -> tuple[Path, TokenizerConfig, int, int]:
    """The store, the tokenizer settings, and ``min_spam``/``min_ham``."""
    from filters.bayes import parse_settings
    from gateway.errors import PolicyError
    from gateway.filterapi import ConfigError

    if args.db is not None:
        s = parse_settings({})
        return args.db, s.tokenizer, s.min_spam, s.min_ham
    from gateway.policy.loader import load_policy

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        raise SetupError("\n".join(e.problems)) from None
    except OSError as e:
        raise SetupError(f"{args.policy}: {e.strerror}") from None
    spec = next((f for f in policy.filters if f.name == "bayes" and f.module is None), None)
    if spec is None:
        raise SetupError(f"{args.policy}: no bayes filter in the chain (or use --db FILE)")
    try:
        s = parse_settings(spec.settings, policy.hostname,
                           lambda p: Path(p) if Path(p).is_absolute() else policy.base_dir / p,
                           policy.state_dir)
    except ConfigError as e:
        raise SetupError("\n".join(f"{args.policy}: filters.bayes.{key}: {reason}"
                                   for key, reason in e.every)) from None
    return s.db_path, s.tokenizer, s.min_spam, s.min_ham


def messages(paths: list[Path]) -> tuple[int, Iterator[tuple[str, bytes | None]]]:
    """(total count, iterator of (where, raw bytes or None when unreadable))."""
    sources: list[tuple[str, Path]] = []  # ("file"|"mbox", path)
    for path in paths:
        if path.is_dir():
            for f in _dir_files(path):
                sources.append((_kind(f), f))
        elif path.is_file():
            sources.append((_kind(path), path))
        elif path.exists():  # a device, a FIFO, a socket: nothing to read messages from
            raise SetupError(f"{path}: not a message file, mbox or directory")
        else:
            raise SetupError(f"{path}: no such file or directory")
    boxes: dict[Path, mailbox.mbox] = {}
    total = 0
    for kind, f in sources:
        if kind == "mbox":
            boxes[f] = mailbox.mbox(f, create=False)
            total += len(boxes[f])
        else:
            total += 1

    def gen() -> Iterator[tuple[str, bytes | None]]:
        for kind, f in sources:
            if kind == "mbox":
                box = boxes[f]
                for i, key in enumerate(box.iterkeys()):
                    try:
                        yield f"{f}#{i + 1}", box.get_bytes(key)
                    except (OSError, KeyError):
                        yield f"{f}#{i + 1}", None
                box.close()
            else:
                try:
                    yield str(f), f.read_bytes()
                except OSError:
                    yield str(f), None

    return total, gen()


def _dir_files(path: Path) -> list[Path]:
    """Every message file under a directory, in name order, hidden files skipped. In a Maildir
    only cur/, new/ and its Maildir++ subfolders (``.Junk``) are read: not tmp/ (deliveries
    in progress) nor anything else kept there."""
    out: list[Path] = []
    for root, dirs, files in os.walk(path):
        here = Path(root)
        if (here / "cur").is_dir() and (here / "new").is_dir():  # a Maildir
            dirs[:] = sorted(d for d in dirs if d in ("cur", "new")
                             or d.startswith(".") and (here / d / "cur").is_dir())
            continue  # files beside cur/ and new/ are not messages
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(here / f for f in sorted(files) if not f.startswith("."))
    return out


def _kind(f: Path) -> str:
    if f.suffix.lower() == ".eml":
        return "file"  # one message, even with an mbox "From " line on top
    try:
        with f.open("rb") as fh:
            head = fh.read(5)
    except OSError:
        return "file"
    return "mbox" if head == b"From " else "file"


class Progress:
    def __init__(self, total: int, err: TextIO, interval_s: float) -> None:
        self.total, self.err = total, err
        self.tty = err.isatty()
        self.interval_s = 0.1 if self.tty else interval_s
        self.start = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.interval_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100 * done // self.total if self.total else 100
        if self.tty:
            width = 30
            fill = width * done // self.total if self.total else width
            self.err.write(f"\r[{'#' * fill}{' ' * (width - fill)}] {done}/{self.total} "
                           f"{pct:3d}% {rate:.0f} msg/s")
            if final:
                self.err.write("\n")
        elif not final:
            self.err.write(f"learn: {done}/{self.total} messages ({pct}%), {rate:.0f} msg/s\n")
        self.err.flush()


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    from filters._bayesstore import Change, SqliteStore
    from filters._tokenizer import message_key, token_ids, tokenize
    from filters.bayes import inactive_note
    from gateway.mime import parse_bytes

    try:
        db_path, tok_cfg, min_spam, min_ham = _settings(args)
        total, stream = messages(args.paths)
    except SetupError as e:
        print(f"mailgate learn: {e}", file=err)
        return EXIT_ERRORS
    try:
        store = SqliteStore(db_path)
    except Exception as e:  # sqlite3.Error, OSError: the store cannot be opened or created
        print(f"mailgate learn: {db_path}: {e}", file=err)
        return EXIT_ERRORS
    klass = None if args.klass == "forget" else args.klass
    counts: Counter[str] = Counter()
    progress = Progress(total, err, args.progress_interval)
    batch: list[Change] = []
    done = 0

    def flush() -> None:
        counts.update(store.apply(batch))
        batch.clear()

    try:
        for where, raw in stream:
            done += 1
            try:
                if raw is None:
                    raise OSError("cannot read")
                tokens = tokenize(parse_bytes(raw), tok_cfg)
                batch.append(Change(message_key(raw), klass, token_ids(tokens)))
            except Exception as e:  # a message we cannot parse: count it, go on
                counts["errors"] += 1
                if progress.tty:
                    err.write("\n")
                print(f"mailgate learn: {where}: {type(e).__name__}: {e}", file=err)
            if len(batch) >= BATCH:
                flush()
            progress.update(done)
        if batch:
            flush()
        totals = store.snapshot(())
    finally:
        store.close()
    progress.update(done, final=True)
    secs = time.monotonic() - progress.start
    rate = done / max(secs, 1e-9)
    if klass is None:
        summary = (f"forgot {counts['forgotten']}, not known {counts['unknown']}, "
                   f"errors {counts['errors']}")
    else:
        other = "ham" if klass == "spam" else "spam"
        summary = (f"learned {counts['learned']} as {klass}, already known {counts['known']} "
                   f"(skipped), relearned {counts['relearned']} ({other} -> {klass}), "
                   f"errors {counts['errors']}")
    print(f"{summary}; {done} messages in {secs:.1f} s ({rate:.0f} msg/s); store {db_path}",
          file=out)
    note = inactive_note(totals.nspam, totals.nham, min_spam, min_ham)
    if note is not None:  # the filter reports BAYES_UNTRAINED only: say so, with the counts
        print(f"{note} (until then every message scores BAYES_UNTRAINED)", file=out)
    return EXIT_ERRORS if counts["errors"] else EXIT_OK
