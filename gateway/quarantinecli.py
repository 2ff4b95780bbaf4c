"""``mailgate quarantine``: list, show, release, delete and expire quarantined messages, whether
the gateway runs or not (see ``gateway/quarantine.py`` for where they live).

``release`` moves a message into the queue (hold/ -> active/): the queue manager of the running
gateway — it runs in either relay mode — delivers it to the original recipients at its next scan.
Changes claim the message (the spool's ``flock``), like ``mailgate queue``.

Exit codes (as for every ``mailgate`` command): 0 done; 1 a message was not found or busy, or
the policy, the spool or the quarantine index is unusable; 2 bad usage (the command line).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.errors import SpoolError
from gateway.policy.schema import Policy
from gateway.quarantine import NotQuarantined, Quarantine, QuarantineError, Record
from gateway.queue_entry import QueueEntry, SpoolBusy, SpoolCorrupt
from gateway.queuecli import (
    EXIT_FAIL,
    EXIT_OK,
    SetupError,
    load_spool_policy,
    open_spool_dir,
    qid_arg,
    run_command,
    spool_parents,
)
from gateway.queuecli import _iso as iso
from gateway.queuecli import _local as local
from gateway.queuecli import _span as span

log = logging.getLogger("mailgate.quarantine")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def since_arg(text: str) -> float:
    """``--since``: a duration back from now (``90s``, ``30m``, ``12h``, ``7d``, ``2w``) or an
    ISO 8601 date/time (local time unless it carries an offset). Returns a Unix time."""
    m = _DURATION.match(text.strip().lower())
    if m:
        return time.time() - float(m[1]) * _UNITS[m[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration (30m, 12h, 7d) or an ISO date/time: {text!r}") from None


def _count(text: str) -> int:
    """``--limit``: an integer >= 0 (SQLite reads a negative LIMIT as none at all)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser, policy_help: str) -> None:
    common, waiting = spool_parents(
        parser, policy_help, log_help="format of the log lines (changes) on stderr",
        wait_help="if another process is changing the message, wait for it")
    sub = parser.add_subparsers(dest="quarantine_cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="quarantined messages, oldest first")
    p.add_argument("--json", action="store_true", help="a JSON array with every field")
    p.add_argument("--since", type=since_arg, metavar="WHEN",
                   help="quarantined since: 30m, 12h, 7d, or an ISO date/time")
    p.add_argument("--sender", metavar="TEXT", help="sender contains TEXT (any case)")
    p.add_argument("--rcpt", metavar="TEXT", help="a recipient contains TEXT (any case)")
    p.add_argument("--limit", type=_count, metavar="N", help="at most N messages")

    p = sub.add_parser("show", parents=[common],
                       help="one message: metadata and headers (--raw: the whole message)")
    p.add_argument("qid", type=qid_arg)
    p.add_argument("--json", action="store_true", help="a JSON object with every field")
    p.add_argument("--raw", action="store_true",
                   help="only the message bytes, exactly as they would be relayed "
                        "(with --json: message_base64)")

    p = sub.add_parser("release", parents=[common, waiting],
                       help="deliver to the original recipients (through the queue)")
    p.add_argument("qids", nargs="+", type=qid_arg, metavar="QID")

    p = sub.add_parser("delete", parents=[common, waiting], help="delete for good")
    p.add_argument("qids", nargs="+", type=qid_arg, metavar="QID")

    sub.add_parser("expire", parents=[common],
                   help="delete what is older than quarantine.retention_s (the running "
                        "gateway also does this every quarantine.expire_interval_s)")


def open_quarantine(policy_path: Path) -> tuple[Quarantine, Policy]:
    policy = load_spool_policy(policy_path)
    directory = policy.spool.directory
    owner = directory.stat().st_uid
    if os.geteuid() != owner:  # the index is written (WAL files too): the owner's files only
        raise SetupError(f"the spool {directory} belongs to uid {owner}: run mailgate "
                         f"quarantine as that user (not uid {os.geteuid()})")
    return Quarantine(open_spool_dir(directory)), policy


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr

    def command() -> int:
        q, policy = open_quarantine(args.policy)
        cli = QuarantineCli(q, policy, out, err)
        cmd = args.quarantine_cmd
        if cmd == "list":
            return cli.list_(args)
        if cmd == "show":
            return cli.show(args.qid, as_json=args.json, raw=args.raw)
        if cmd == "expire":
            return cli.expire()
        return cli.change(cmd, args.qids, wait=args.wait)

    return run_command("mailgate quarantine", command, err, setup_errors=(QuarantineError,))


def _symbols_text(r: Record) -> str:
    return " ".join(f"{s.name}({s.score:g})" + (f"[{'|'.join(s.options)[:80]}]"
                                                if s.options else "") for s in r.symbols)


def record_obj(r: Record, entry: QueueEntry | None, retention_s: float) -> dict[str, Any]:
    obj = r.to_obj()
    obj["quarantined_iso"] = iso(r.quarantined_at)
    obj["expires"] = r.quarantined_at + retention_s
    obj["expires_iso"] = iso(r.quarantined_at + retention_s)
    if entry is not None:
        obj["envelope"] = {
            "sender": entry.sender, "mail_params": list(entry.mail_params),
            "envid": entry.envid, "ret": entry.ret,
            "recipients": [{"addr": x.addr, "notify": sorted(x.notify) if x.notify is not None
                            else None, "orcpt": x.orcpt} for x in entry.recipients]}
    return obj


class QuarantineCli:
    def __init__(self, q: Quarantine, policy: Policy, out: TextIO, err: TextIO) -> None:
        self.q, self.policy = q, policy
        self.out, self.err = out, err
        self.retention_s = policy.quarantine.retention_s

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def warn(self, text: str) -> None:
        print(text, file=self.err)

    def list_(self, args: argparse.Namespace) -> int:
        self.q.sync()
        records = self.q.find(since=args.since, sender=args.sender, rcpt=args.rcpt,
                              limit=args.limit)
        if args.json:
            json.dump([record_obj(r, None, self.retention_s) for r in records], self.out,
                      ensure_ascii=False)
            self.say()
            return EXIT_OK
        if not records:
            self.say("Quarantine is empty" if not any(
                (args.since, args.sender, args.rcpt)) else "No quarantined message matches")
            return EXIT_OK
        self.say(f"{'-Queue ID-':<16} {'--Size--':>8} {'--Quarantined-------':<20} "
                 f"{'Score':>6}  -Reason / Sender / Recipients-")
        indent = " " * 8
        for r in records:
            self.say(f"{r.qid} {r.size:>8} {local(r.quarantined_at):<20} {r.score:>6g}  "
                     f"{r.reason}")
            self.say(f"{indent}from {r.sender or '<>'}")
            self.say(f"{indent}to {', '.join(r.recipients)}")
            if r.subject is not None:
                self.say(f"{indent}subject: {r.subject[:120]}")
            if r.symbols:
                self.say(f"{indent}symbols: {_symbols_text(r)}")
            self.say()
        n = len(records)
        self.say(f"-- {n} message{'s' if n != 1 else ''}, "
                 f"{sum(r.size for r in records) // 1024 + 1} KiB; kept "
                 f"{span(self.retention_s)} (quarantine.retention_s)")
        return EXIT_OK

    def show(self, qid: str, *, as_json: bool, raw: bool) -> int:
        try:
            record, entry = self.q.get(qid)
            message = self.q.message(qid)
        except NotQuarantined as e:
            self.warn(f"{e} (never quarantined, released, deleted or expired)")
            return EXIT_FAIL
        except SpoolError as e:
            self.warn(f"{qid}: unreadable: {e}")
            return EXIT_FAIL
        if as_json:
            obj = record_obj(record, entry, self.retention_s)
            end = message.find(b"\r\n\r\n")
            obj["headers"] = message[:end + 2 if end >= 0 else len(message)].decode(
                "utf-8", "replace")
            if raw:
                obj["message_base64"] = base64.b64encode(message).decode("ascii")
            json.dump(obj, self.out, ensure_ascii=False)
            self.say()
            return EXIT_OK
        if raw:
            self.out.flush()
            self.out.buffer.write(message)
            self.out.buffer.flush()
            return EXIT_OK
        self._show_text(record, entry)
        end = message.find(b"\r\n\r\n")
        head = message[:end + 2] if end >= 0 else message
        self.say(f"-- headers ({len(message)} bytes in all; --raw for the whole message) --")
        self.out.flush()
        self.out.buffer.write(head)
        self.out.buffer.flush()
        return EXIT_OK

    def _show_text(self, r: Record, entry: QueueEntry) -> None:
        def row(key: str, value: object) -> None:
            self.say(f"{key + ':':<14}{value}")

        now = time.time()
        expires = r.quarantined_at + self.retention_s
        row("qid", r.qid)
        row("quarantined", f"{local(r.quarantined_at, '%Y-%m-%d %H:%M:%S %z')} "
                           f"({span(now - r.quarantined_at)} ago)")
        row("expires", f"{local(expires, '%Y-%m-%d %H:%M:%S %z')} "
                       f"({'in ' + span(expires - now) if expires > now else 'due now'})")
        row("size", f"{r.size} bytes")
        row("sender", f"<{entry.sender}>")
        if entry.mail_params:
            row("mail params", " ".join(entry.mail_params))
        if entry.envid is not None or entry.ret is not None:
            row("dsn", f"envid={entry.envid or '-'} ret={entry.ret or '-'}")
        row("client", f"{entry.client_ip or '-'} (helo {entry.helo or '-'})")
        row("class", r.policy_class)
        row("score", f"{r.score:g}")
        row("reason", r.reason)
        if r.subject is not None:
            row("subject", r.subject)
        if r.message_id is not None:
            row("message-id", r.message_id)
        self.say("recipients:")
        for x in entry.recipients:
            extra = []
            if x.notify is not None:
                extra.append("notify=" + ",".join(sorted(x.notify)))
            if x.orcpt:
                extra.append(f"orcpt={x.orcpt}")
            self.say(f"  {x.addr}  {' '.join(extra)}".rstrip())
        self.say("symbols:")
        for s in r.symbols:
            opts = f"  [{' | '.join(s.options)}]" if s.options else ""
            self.say(f"  {s.name:<28} {s.score:>6g}{opts}")

    def change(self, cmd: str, qids: list[str], *, wait: bool) -> int:
        status = EXIT_OK
        by = f"uid:{os.geteuid()}"
        released = 0
        for qid in dict.fromkeys(qids):
            try:
                if cmd == "release":
                    entry = self.q.release(qid, wait=wait, by=by)
                    released += 1
                    self.say(f"{qid}: released to the queue (hold -> active) for "
                             f"{', '.join(r.addr for r in entry.recipients)}")
                else:
                    try:
                        entry = self.q.delete(qid, wait=wait, by=by)
                    except SpoolCorrupt as e:  # unreadable: set it aside, as recovery would
                        where = self.q.spool.set_aside(qid, str(e))
                        self.say(f"{qid}: unreadable ({e}): moved to {where}")
                        continue
                    self.say(f"{qid}: deleted ({entry.size} bytes, from {entry.sender or '<>'})")
            except NotQuarantined as e:
                self.warn(f"{e} (never quarantined, released, deleted or expired)")
                status = EXIT_FAIL
            except SpoolBusy:
                self.warn(f"{qid}: busy: being changed by another mailgate process; try again, "
                          "or use --wait")
                status = EXIT_FAIL
            except SpoolError as e:
                self.warn(f"{qid}: {e}")
                status = EXIT_FAIL
        if released:
            self.say(f"-- a running gateway (either relay mode) delivers within "
                     f"queue.scan_interval_s = {self.policy.queue.scan_interval_s:g}s; "
                     "if none runs, when one starts (see `mailgate queue list`)")
        return status

    def expire(self) -> int:
        done = self.q.expire(self.retention_s, by=f"uid:{os.geteuid()}")
        self.say(f"-- expired {len(done)} message{'s' if len(done) != 1 else ''} older than "
                 f"{span(self.retention_s)} (quarantine.retention_s)")
        return EXIT_OK
