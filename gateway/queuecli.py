"""``mailgate queue``: look at and manage the spool, whether the gateway runs or not.

Reads (``list``, ``show``) take no lock: they see a snapshot, and a message may be delivered
while it is shown. Every change (``flush``, ``delete``, ``hold``, ``release``) claims the message
through ``Spool.claim`` — the same ``flock`` the running gateway's queue manager takes to deliver
it — so a change never overlaps a delivery: a message being delivered right now is reported busy
(exit 1) or, with ``--wait``, changed once the attempt ends. The running gateway sees a change
at its next scan (``queue.scan_interval_s``); nothing needs to signal it.

Exit codes (as for every ``mailgate`` command): 0 done; 1 a message was not found, busy, or in
the wrong state for the command, or the policy or the spool is unusable (not found, invalid,
unreadable, owned by another user); 2 bad usage (the command line).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from gateway.errors import PolicyError, SpoolError
from gateway.logs import event
from gateway.queue_entry import (
    QUEUE_AREAS,
    Area,
    QueueEntry,
    SpoolBusy,
    SpoolCorrupt,
    SpoolMissing,
    is_qid,
)
from gateway.spool import Spool

if TYPE_CHECKING:
    from gateway.policy.schema import Policy

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
MARKS: dict[str, str] = {"active": "*", "deferred": " ", "hold": "!"}
log = logging.getLogger("mailgate.queue")


class UsageError(Exception):
    """Exit 2: the command line is wrong."""


class SetupError(Exception):
    """Exit 1: the policy or the spool cannot be used (missing, invalid, another owner)."""


def qid_arg(text: str) -> str:
    """A queue ID from the command line (case-insensitive)."""
    qid = text.strip().upper()
    if not is_qid(qid):
        raise argparse.ArgumentTypeError(
            f"not a queue ID: {text!r} (16 characters of 0-9 and A-Z without I, L, O, U)")
    return qid


def spool_parents(parser: argparse.ArgumentParser, policy_help: str, *, log_help: str,
                  wait_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``--policy`` and ``--log-format`` on a spool command (queue, quarantine), and the
    parents its subcommands share: ``--policy`` after the subcommand too, and ``--wait``."""
    parser.add_argument("--policy", type=Path, default=None,
                        help=f"policy file naming spool.directory ({policy_help})")
    parser.add_argument("--log-format", choices=("kv", "json"), default="kv", help=log_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--policy", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help=wait_help)
    return common, waiting


def add_arguments(queue: argparse.ArgumentParser, policy_help: str) -> None:
    """The ``queue`` subcommands; ``--policy`` is accepted before or after the subcommand."""
    common, waiting = spool_parents(
        queue, policy_help,
        log_help="format of the log lines (changes, unreadable files) on stderr",
        wait_help="if a message is being delivered right now, wait for that attempt to end "
                  "instead of failing (exit 1)")
    sub = queue.add_subparsers(dest="queue_cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="list queued messages (like mailq)")
    p.add_argument("--area", choices=(*QUEUE_AREAS, "all"), default="all")
    p.add_argument("--json", action="store_true", help="a JSON array with every field")

    p = sub.add_parser("show", parents=[common], help="one message's metadata (and content)")
    p.add_argument("qid", type=qid_arg)
    p.add_argument("--json", action="store_true", help="a JSON object with every field")
    p.add_argument("--body", action="store_true",
                   help="also the message as it will be relayed (JSON: message_base64)")

    p = sub.add_parser("flush", parents=[common, waiting],
                       help="retry now: deferred -> active (without QID: every deferred message)")
    p.add_argument("qids", nargs="*", type=qid_arg, metavar="QID")

    p = sub.add_parser("delete", parents=[common, waiting],
                       help="remove messages from the queue (no bounce is sent)")
    p.add_argument("qids", nargs="*", type=qid_arg, metavar="QID")
    p.add_argument("--all-deferred", action="store_true", help="every deferred message")

    p = sub.add_parser("hold", parents=[common, waiting],
                       help="move to hold/: never delivered until released")
    p.add_argument("qids", nargs="+", type=qid_arg, metavar="QID")

    p = sub.add_parser("release", parents=[common, waiting],
                       help="hold -> active, to be delivered now")
    p.add_argument("qids", nargs="+", type=qid_arg, metavar="QID")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    if args.queue_cmd == "delete" and bool(args.qids) == args.all_deferred:
        print("mailgate queue delete: give QID... or --all-deferred (not both)", file=err)
        return EXIT_USAGE

    def command() -> int:
        spool, scan_interval_s = open_spool(args.policy)
        cli = QueueCli(spool, out, err, scan_interval_s=scan_interval_s)
        cmd = args.queue_cmd
        if cmd == "list":
            return cli.list_queue(args.area, as_json=args.json)
        if cmd == "show":
            return cli.show(args.qid, as_json=args.json, body=args.body)
        cli.wait = args.wait
        cli.check_owner()
        if cmd == "flush":
            return cli.flush(args.qids)
        if cmd == "delete":
            return cli.delete(args.qids, all_deferred=args.all_deferred)
        if cmd == "hold":
            return cli.each(args.qids, cli.hold)
        return cli.each(args.qids, cli.release)

    return run_command("mailgate queue", command, err, permission_hint=" (run as the spool's "
                       "owner, or as root to read)")


def run_command(prog: str, command: Callable[[], int], err: TextIO, *,
                setup_errors: tuple[type[Exception], ...] = (),
                permission_hint: str = "") -> int:
    """``command()``'s exit code, with what the spool commands share: a UsageError is a message
    on ``err`` and exit 2; a SetupError (or one of ``setup_errors``) or a PermissionError a
    message and exit 1; a closed stdout (``mailgate queue list | head``) is not an error;
    Ctrl-C is 130."""
    caught: tuple[type[Exception], ...] = (SetupError, *setup_errors)
    try:
        return command()
    except UsageError as e:
        print(f"{prog}: {e}", file=err)
        return EXIT_USAGE
    except caught as e:
        print(f"{prog}: {e}", file=err)
        return EXIT_FAIL
    except PermissionError as e:
        print(f"{prog}: {e.filename or 'spool'}: permission denied{permission_hint}", file=err)
        return EXIT_FAIL
    except BrokenPipeError:  # e.g. `mailgate queue list | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def open_spool(policy_path: Path) -> tuple[Spool, float]:
    """The policy's spool and its ``queue.scan_interval_s``."""
    policy = load_spool_policy(policy_path)
    return open_spool_dir(policy.spool.directory), policy.queue.scan_interval_s


def load_spool_policy(policy_path: Path) -> Policy:
    """The policy, whose spool directory must exist (the gateway makes it at start)."""
    from gateway.policy.loader import load_policy

    try:
        policy = load_policy(policy_path)
    except PolicyError as e:
        raise SetupError("; ".join(e.problems)) from None
    directory = policy.spool.directory
    if directory.exists() and not directory.is_dir():
        raise SetupError(f"spool directory {directory.absolute()}: not a directory "
                         f"(spool.directory of {policy_path})")
    if not directory.is_dir():
        from gateway.policy.locate import state_dir

        state = state_dir(policy_path)
        where = ("spool.directory is not set: its default is ./spool in the directory the "
                 "command runs in; run it where the gateway runs, or set it in the policy"
                 if not directory.is_absolute() else
                 f"spool.directory is not set: its default is spool in the state directory, "
                 f"{state}"
                 if state is not None and directory == state / "spool" else
                 "a relative spool.directory is relative to the policy file's directory")
        raise SetupError(f"spool directory {directory.absolute()} does not exist: has the "
                         f"gateway run with this policy ({policy_path})? ({where})")
    return policy


def open_spool_dir(directory: Path) -> Spool:
    try:
        return Spool(directory)
    except OSError as e:
        raise SetupError(f"cannot open the spool {directory}: {e}") from None


# -- presentation -----------------------------------------------------------------------------

def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _local(t: float, fmt: str = "%a %b %d %H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(t))


def _span(seconds: float) -> str:
    s = int(round(abs(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _sender(entry: QueueEntry) -> str:
    return entry.sender or "<>"


def _due(area: str, entry: QueueEntry, now: float) -> bool:
    return area != "hold" and entry.next_attempt <= now


def entry_obj(area: Area, entry: QueueEntry, now: float) -> dict[str, Any]:
    """Every stored field (the spool's JSON form, so new fields appear here too), ``area``, and
    conveniences: ISO 8601 UTC times, ``due``, ``prepend`` as text."""
    obj: dict[str, Any] = json.loads(entry.to_json())
    obj.pop("format", None)
    obj["prepend"] = entry.prepend.decode("utf-8", "replace")
    return {"qid": entry.qid, "area": area, **obj, "arrival_iso": _iso(entry.arrival),
            "next_attempt_iso": _iso(entry.next_attempt), "due": _due(area, entry, now)}


def _status(area: str, entry: QueueEntry, now: float) -> str | None:
    """The parenthesised line under a message in ``list``; None when there is nothing to say."""
    tries = f"{entry.attempts} attempt{'s' if entry.attempts != 1 else ''}"
    if area == "hold":
        head = f"on hold, {tries}"
    elif area == "deferred" or entry.last_error:
        wait = entry.next_attempt - now
        head = f"{tries}, next {'in ' + _span(wait) if wait > 0 else 'now'}"
    else:
        return None
    return f"({head}: {entry.last_error})" if entry.last_error else f"({head})"


def _rcpt_lines(entry: QueueEntry, indent: str) -> list[str]:
    lines = []
    for r in entry.recipients:
        reply = f": {r.last_reply}" if r.last_reply else ""
        lines.append(f"{indent}{r.addr}  {r.state}{reply}")
    return lines


class QueueCli:
    def __init__(self, spool: Spool, out: TextIO, err: TextIO, *,
                 scan_interval_s: float = 5.0) -> None:
        self.spool = spool
        self.out, self.err = out, err
        self.scan_interval_s = scan_interval_s
        self.wait = False
        self.flushed = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def warn(self, text: str) -> None:
        print(text, file=self.err)

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self, areas: Iterable[Area]) -> list[tuple[Area, QueueEntry]]:
        """Entries in arrival (qid) order. A message moved during the scan is listed once."""
        seen: dict[str, tuple[Area, QueueEntry]] = {}
        for area in areas:
            for entry in self.spool.entries(area):
                seen.setdefault(entry.qid, (area, entry))
        return [seen[q] for q in sorted(seen)]

    def list_queue(self, area: str, *, as_json: bool) -> int:
        areas = QUEUE_AREAS if area == "all" else (cast(Area, area),)
        entries = self.snapshot(areas)
        now = time.time()
        if as_json:
            json.dump([entry_obj(a, e, now) for a, e in entries], self.out, ensure_ascii=False)
            self.say()
            return EXIT_OK
        if not entries:
            self.say("Mail queue is empty")
            return EXIT_OK
        self.say(f"{'-Queue ID-':<17} {'--Size--':>8} {'----Arrival Time----':<20} "
                 "-Sender/Recipient-------")
        indent = " " * 8
        for a, e in entries:
            self.say(f"{e.qid}{MARKS[a]} {e.size:>8} {_local(e.arrival):<20} {_sender(e)}")
            status = _status(a, e, now)
            if status:
                self.say(indent + status)
            for line in _rcpt_lines(e, indent):
                self.say(line)
            self.say()
        total = sum(e.size for _, e in entries)
        n = len(entries)
        self.say(f"-- {math.ceil(total / 1024)} KiB in {n} message{'s' if n != 1 else ''}")
        return EXIT_OK

    def show(self, qid: str, *, as_json: bool, body: bool) -> int:
        try:
            area, entry = self.spool.load(qid)
            message = self._message(entry) if body else None
        except SpoolMissing:
            self.warn(f"{qid}: not in the queue (never queued, delivered, or deleted)")
            return EXIT_FAIL
        except SpoolError as e:
            self.warn(f"{qid}: unreadable: {e}")
            return EXIT_FAIL
        now = time.time()
        if as_json:
            obj = entry_obj(area, entry, now)
            if message is not None:
                obj["message_base64"] = base64.b64encode(message).decode("ascii")
            json.dump(obj, self.out, ensure_ascii=False)
            self.say()
            return EXIT_OK
        self._show_text(area, entry, now)
        if message is not None:
            self.say(f"-- message: {len(message)} bytes, as it will be relayed --")
            self.out.flush()
            self.out.buffer.write(message)
            self.out.buffer.flush()
        return EXIT_OK

    def _message(self, entry: QueueEntry) -> bytes:
        with self.spool.open_outgoing(entry) as f:
            return f.read()

    def _show_text(self, area: Area, entry: QueueEntry, now: float) -> None:
        def row(key: str, value: object) -> None:
            self.say(f"{key + ':':<14}{value}")

        due = "now" if entry.next_attempt <= now else f"in {_span(entry.next_attempt - now)}"
        row("qid", entry.qid)
        row("area", area + {"hold": " (never delivered until released)",
                            "active": "", "deferred": ""}[area])
        row("size", f"{entry.size} bytes" + (
            f", relayed with its first {entry.skip} (the received header block) replaced by "
            f"{len(entry.prepend)} bytes of edited headers" if entry.skip else
            f" + {len(entry.prepend)} bytes of headers to prepend" if entry.prepend else ""))
        row("arrival", f"{_local(entry.arrival, '%Y-%m-%d %H:%M:%S %z')} "
                       f"({_span(now - entry.arrival)} ago)")
        row("sender", f"<{entry.sender}>")
        if entry.mail_params:
            row("mail params", " ".join(entry.mail_params))
        if entry.envid is not None or entry.ret is not None:
            row("dsn", f"envid={entry.envid or '-'} ret={entry.ret or '-'}")
        row("client", f"{entry.client_ip or '-'} (helo {entry.helo or '-'})")
        if entry.decision:
            row("decision", " ".join(f"{k}={_plain(v)}" for k, v in entry.decision.items()))
        row("attempts", entry.attempts)
        if area == "hold":
            row("next attempt", "none while on hold")
        else:
            row("next attempt", f"{_local(entry.next_attempt, '%Y-%m-%d %H:%M:%S %z')} ({due})"
                if entry.next_attempt > 0 else "now")
        row("last error", entry.last_error or "-")
        self.say("recipients:")
        for r in entry.recipients:
            extra = [f"attempts={r.attempts}"]
            if r.notify is not None:
                extra.append("notify=" + ",".join(sorted(r.notify)))
            if r.orcpt:
                extra.append(f"orcpt={r.orcpt}")
            self.say(f"  {r.addr}  {r.state}  {' '.join(extra)}")
            if r.last_reply:
                self.say(f"      {r.last_reply}")

    # -- changes ----------------------------------------------------------------------------
    def check_owner(self) -> None:
        """Changes rewrite metadata files (0600). Written by anyone but the spool's owner —
        root, typically — they would be unreadable to the gateway: refuse."""
        try:
            owner = self.spool.root.stat().st_uid
        except OSError as e:
            raise SetupError(f"cannot stat the spool {self.spool.root}: {e}") from None
        if os.geteuid() != owner:
            try:
                import pwd

                name = f" ({pwd.getpwuid(owner).pw_name})"
            except (ImportError, KeyError):
                name = ""
            raise SetupError(
                f"the spool {self.spool.root} belongs to uid {owner}{name}: run queue changes "
                f"as that user (files written as uid {os.geteuid()} would be unreadable to "
                "the gateway)")

    def _claimed(self, qid: str, change: Callable[[Area, QueueEntry], int], *,
                 quiet_missing: bool = False) -> int | None:
        """Run ``change`` under the message's claim. None if busy (reported), EXIT_FAIL if not
        queued (reported unless ``quiet_missing``), else what ``change`` returns."""
        try:
            with self.spool.claim(qid, wait=self.wait) as (area, entry):
                return change(area, entry)
        except SpoolBusy:
            self.warn(f"{qid}: busy: being delivered right now (or changed by another mailgate "
                      "process); try again, or use --wait")
            return None
        except SpoolMissing:
            if not quiet_missing:
                self.warn(f"{qid}: not in the queue (never queued, delivered, or deleted)")
            return EXIT_FAIL
        except SpoolError as e:
            self.warn(f"{qid}: {e}")
            return EXIT_FAIL

    def each(self, qids: list[str], change: Callable[[Area, QueueEntry], int]) -> int:
        status = EXIT_OK
        for qid in dict.fromkeys(qids):
            rc = self._claimed(qid, change)
            if rc != EXIT_OK:
                status = EXIT_FAIL
        return status

    def _log(self, action: str, area: Area, entry: QueueEntry, to: str | None, **extra: Any
             ) -> None:
        event(log, "queue-change", action=action, qid=entry.qid, area=area, to=to,
              sender=_sender(entry), rcpts=[r.addr for r in entry.recipients],
              size=entry.size, uid=os.geteuid(), **extra)

    def _flush_one(self, area: Area, entry: QueueEntry) -> int:
        if area == "hold":
            self.warn(f"{entry.qid}: on hold: `mailgate queue release {entry.qid}` to deliver it")
            return EXIT_FAIL
        now = time.time()
        if entry.next_attempt > now:
            self.spool.update(replace(entry, next_attempt=now), area)
        if area == "deferred":
            self.spool.move(entry.qid, "deferred", "active")
        self._log("flush", area, entry, "active")
        self.say(f"{entry.qid}: flushed ({area} -> active)" if area == "deferred"
                 else f"{entry.qid}: flushed (already active, due now)")
        self.flushed += 1
        return EXIT_OK

    def flush(self, qids: list[str]) -> int:
        if qids:
            rc = self.each(qids, self._flush_one)
        else:
            rc = self._bulk("flush", "deferred", self._flush_one)
        if self.flushed:
            self.say(f"-- a running gateway delivers within its scan interval "
                     f"(queue.scan_interval_s = {self.scan_interval_s:g}s)")
        return rc

    def _delete_one(self, area: Area, entry: QueueEntry) -> int:
        self.spool.remove(entry.qid)
        pending = [r.addr for r in entry.pending]
        self._log("delete", area, entry, None, pending=pending, attempts=entry.attempts,
                  last_error=entry.last_error)
        self.say(f"{entry.qid}: deleted from {area}/ ({entry.size} bytes, from "
                 f"{_sender(entry)}, to {', '.join(r.addr for r in entry.recipients)}; "
                 f"{len(pending)} recipient{'s' if len(pending) != 1 else ''} undelivered)")
        return EXIT_OK

    def delete(self, qids: list[str], *, all_deferred: bool) -> int:
        if all_deferred:
            return self._bulk("delete", "deferred", self._delete_one)
        status = EXIT_OK
        for qid in dict.fromkeys(qids):
            try:
                self.spool.load(qid)
            except SpoolCorrupt as e:  # unreadable: it cannot be claimed; set it aside
                self.say(f"{qid}: unreadable ({e}): moved to {self.spool.set_aside(qid, str(e))}")
                continue
            except SpoolError:
                pass  # missing or busy: reported as such by the claim below
            if self._claimed(qid, self._delete_one) != EXIT_OK:
                status = EXIT_FAIL
        return status

    def _bulk(self, action: str, area: Area,
              change: Callable[[Area, QueueEntry], int]) -> int:
        """``change`` every message in ``area`` (as it is under the claim: one that left the
        area or the queue meanwhile is skipped)."""
        done = busy = 0

        def guarded(now_area: Area, entry: QueueEntry) -> int:
            return change(now_area, entry) if now_area == area else -1

        for _, entry in self.snapshot((area,)):
            rc = self._claimed(entry.qid, guarded, quiet_missing=True)
            if rc is None:
                busy += 1
            elif rc == EXIT_OK:
                done += 1
        verb = {"flush": "flushed", "delete": "deleted"}[action]
        note = f" ({busy} busy)" if busy else ""
        self.say(f"-- {verb} {done} {area} message{'s' if done != 1 else ''}{note}")
        return EXIT_FAIL if busy else EXIT_OK

    def hold(self, area: Area, entry: QueueEntry) -> int:
        if area == "hold":
            self.say(f"{entry.qid}: already on hold")
            return EXIT_OK
        self.spool.move(entry.qid, area, "hold")
        self._log("hold", area, entry, "hold")
        self.say(f"{entry.qid}: held ({area} -> hold)")
        return EXIT_OK

    def release(self, area: Area, entry: QueueEntry) -> int:
        if area != "hold":
            self.say(f"{entry.qid}: not on hold (in {area}/), nothing to do")
            return EXIT_OK
        if entry.decision.get("action") == "quarantine":  # its arrival time must be reset
            self.warn(f"{entry.qid}: quarantined: `mailgate quarantine release {entry.qid}` "
                      "to deliver it")
            return EXIT_FAIL
        self.spool.update(replace(entry, next_attempt=time.time()), "hold")
        self.spool.move(entry.qid, "hold", "active")
        self._log("release", area, entry, "active")
        self.say(f"{entry.qid}: released (hold -> active)")
        return EXIT_OK


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)
