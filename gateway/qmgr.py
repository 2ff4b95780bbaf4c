"""The queue manager: delivers what the spool holds. It picks due messages (new ones at once,
deferred ones when their retry time comes), claims each one so no other worker touches it, sends
its pending recipients through their transports, records every recipient's outcome, and then
removes the message (all recipients final), defers it with capped exponential backoff, or
bounces the failures with a DSN (RFC 3464) to the sender — never to the null sender. Deliveries
to a downstream that cannot take NOTIFY (no DSN extension, or a Maildir) get their success DSN
here too, for recipients with NOTIFY=SUCCESS (``dsn.success_action``, ``gateway.dsnqueue``).

Fresh mail and retries share one bounded active set; retries are picked only when due, so a
large deferred queue does not slow fresh mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from gateway import dsn, dsnqueue, supervise
from gateway.dnsresolver import DnsResolver
from gateway.durable import Syncer
from gateway.errors import RelayError, RelayTempError, SpoolError
from gateway.logs import event
from gateway.policy.schema import Policy, QueueConfig
from gateway.queue_entry import QueueEntry, Recipient, RecipientState, SpoolBusy, SpoolMissing
from gateway.relay import maildir
from gateway.relay.client import DownstreamClient
from gateway.relay.pool import DownstreamPool
from gateway.relay.transport import Transport, transport_for
from gateway.replies import Reply
from gateway.smtp import dsnparams
from gateway.spool import Spool

log = logging.getLogger("mailgate.qmgr")

SCAN_TASK = "queue-scan"  # a failed scan's name in supervise.FAILURES
RESCAN_AFTER_FULL_S = 0.05  # the next scan after one that filled its batch
Results = dict[str, tuple[RecipientState, str | None]]


def backoff_s(attempts: int, q: QueueConfig) -> float:
    """Delay before attempt ``attempts + 1``: min, 2x min, 4x min ... capped at max."""
    return min(q.max_backoff_s, q.min_backoff_s * (2 ** max(0, attempts - 1)))


def _domain(addr: str) -> str:
    return addr.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class _Handed:
    """A fresh commit's entry and the descriptor holding its lock (see ``QueueManager.kick``)."""

    entry: QueueEntry
    lock: int


class QueueManager:
    def __init__(self, spool: Spool, policy: Policy, syncer: Syncer | None = None) -> None:
        self.spool = spool
        self.policy = policy
        self.syncer = syncer or Syncer()  # shared with the engine's commits: fewer fsyncs
        self.pool = self._new_pool(policy)
        self.wakeup = asyncio.Event()
        self.busy: set[str] = set()
        # After an attempt that could not save its outcome (e.g. a full disk): the newest state
        # we know, applied to the next attempt, and a pause so that nothing storms.
        self._latest: dict[str, QueueEntry] = {}
        self._not_before: dict[str, float] = {}
        self._slots = asyncio.Semaphore(policy.queue.max_active)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        # committed here, due now: no scan needed; with the commit's entry and claim (the
        # locked descriptor) when the engine handed them over (``kick``)
        self._fresh: deque[tuple[str, _Handed | None]] = deque()
        self._rescan = False

    @staticmethod
    def _new_pool(policy: Policy) -> DownstreamPool:
        q = policy.queue
        return DownstreamPool(policy.relay, policy.relay.helo_name or policy.hostname,
                              max_per_destination=q.max_per_destination,
                              idle_s=q.connection_reuse_s, resolver=DnsResolver(policy.dns),
                              name="queue-pool")

    async def reconfigure(self, policy: Policy) -> None:
        """A reload: new routes and settings for the next attempts."""
        old, self.policy, self.pool = self.pool, policy, self._new_pool(policy)
        await old.close()

    def kick(self, qid: str | None = None, entry: QueueEntry | None = None,
             lock: int | None = None) -> None:
        """Look now rather than at the next scan: ``qid`` was just committed to active/ by this
        process (delivered without a directory scan), or with no qid, something changed on disk
        (a DSN, a flush) and the spool should be scanned.

        ``entry`` and ``lock``: what the commit wrote and a descriptor that has held the
        message's lock since (``Spool.commit_async(keep_lock=True)``), now this manager's to
        close: its delivery needs no claim of its own and no read of the metadata. Taken while
        the backlog of fresh commits is short; otherwise (or if an attempt for it was started
        from a scan meanwhile) closed at once, which releases the lock for the usual claim."""
        if qid is None:
            self._rescan = True
        else:
            handed = None
            if lock is not None:
                if (entry is None or qid in self.busy or self._stopping
                        or len(self._fresh) >= self._batch):
                    os.close(lock)
                else:
                    handed = _Handed(entry, lock)
                    self.busy.add(qid)  # no scan starts another attempt for it
            self._fresh.append((qid, handed))
        self.wakeup.set()

    async def run(self) -> None:
        """Deliver fresh commits as they come (``kick(qid)``) and scan the spool every
        ``scan_interval_s`` for due retries and for mail committed elsewhere (another worker,
        a release from quarantine). A scan that filled its batch is followed by another within
        RESCAN_AFTER_FULL_S: a backlog drains at delivery speed, not one batch per interval."""
        next_scan = 0.0
        while not self._stopping:
            self.wakeup.clear()  # before looking: a kick from now on is not lost
            if self._rescan or time.monotonic() >= next_scan:
                self._rescan = False
                next_scan = time.monotonic() + self.policy.queue.scan_interval_s
                due = await self._scan()
                await self._dispatch(due)
                if len(due) >= self._batch:  # more may be due behind these: look again soon
                    # (not at once: messages another worker has claimed would come back
                    # from every scan, and an immediate rescan would spin on them)
                    next_scan = min(next_scan, time.monotonic() + RESCAN_AFTER_FULL_S)
            while self._fresh and not self._stopping and not self._rescan \
                    and time.monotonic() < next_scan:
                qid, handed = self._fresh.popleft()
                if handed is None:
                    await self._dispatch([qid])
                else:
                    await self._dispatch_handed(qid, handed)
            if self._rescan or self._fresh:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_scan - time.monotonic())):
                    await self.wakeup.wait()

    @property
    def _batch(self) -> int:
        return self.policy.queue.max_active * 2

    async def _scan(self) -> list[str]:
        """Due qids not already in flight here nor paused after a failed save."""
        now = time.time()
        skip = frozenset(self.busy) | {q for q, t in self._not_before.items() if t > now}
        try:
            due = await asyncio.to_thread(self.spool.due, now, self._batch, skip)
        except Exception as e:  # traceback once, then one line per scan while it persists
            supervise.report(SCAN_TASK, e, context="a scan; the next in "
                                                   f"{self.policy.queue.scan_interval_s:g}s")
            return []
        supervise.succeeded(SCAN_TASK)
        return due

    async def _dispatch(self, qids: list[str]) -> None:
        """Start an attempt for each qid, waiting for a free slot (max_active) before each."""
        for qid in qids:
            if qid in self.busy or self._stopping or self._not_before.get(qid, 0) > time.time():
                continue
            await self._slots.acquire()
            self.busy.add(qid)
            task = asyncio.create_task(self._attempt(qid), name=f"deliver:{qid}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch_handed(self, qid: str, handed: _Handed) -> None:
        """Start the attempt for a fresh commit handed over with its claim (already busy)."""
        started = False
        try:
            if not self._stopping:
                await self._slots.acquire()
                if self._stopping:
                    self._slots.release()
                    return
                task = asyncio.create_task(self._attempt(qid, handed), name=f"deliver:{qid}")
                started = True
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            if not started:  # stopping or cancelled
                self._release_handed(qid, handed)

    def _release_handed(self, qid: str, handed: _Handed) -> None:
        """Give up a claim handed over and not used: the lock goes, the message stays queued
        (for a scan, or the next start)."""
        os.close(handed.lock)
        self.busy.discard(qid)

    def _drop_handed(self) -> None:
        """Release the claims of fresh commits not yet started (stopping)."""
        for qid, handed in self._fresh:
            if handed is not None:
                self._release_handed(qid, handed)
        self._fresh.clear()

    async def stop(self, grace_s: float) -> None:
        """Stop picking new work; let attempts in flight finish for ``grace_s`` (the rest are
        cancelled: their messages stay queued and are retried after a restart)."""
        self._stopping = True
        self._drop_handed()
        self.wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
        await self.pool.close()

    async def _attempt(self, qid: str, handed: _Handed | None = None) -> None:
        try:
            # Claim, read and release on the loop itself: a non-blocking flock and a small
            # read on the local spool (thread trips for them cost more than the calls, and
            # under load every trip means GIL hand-offs; the loop already writes DATA there).
            # A fresh commit handed over comes with its claim and entry: neither is needed.
            claim = (self.spool.claim(qid) if handed is None
                     else self.spool.claimed(qid, handed.lock, handed.entry))
            try:
                area, entry = claim.__enter__()
            except (SpoolBusy, SpoolMissing):
                return
            try:
                latest = self._latest.get(qid)
                if latest is not None and latest.attempts >= entry.attempts:
                    entry = latest  # newer than the disk: an earlier save failed
                # Not "hold", and still due: the scan's view may be stale (an attempt here or
                # in another worker may have deferred it since), and backoff must hold.
                if area != "hold" and entry.next_attempt <= time.time():
                    await self._deliver(area, entry)
            finally:
                claim.__exit__(None, None, None)
        except Exception:
            log.exception("delivery attempt failed (qid %s); pausing it", qid)
            self._not_before[qid] = time.time() + self.policy.queue.min_backoff_s
        finally:
            self.busy.discard(qid)
            self._slots.release()

    async def _deliver(self, area: str, entry: QueueEntry) -> None:
        relay = self.policy.relay
        groups: dict[Transport, list[Recipient]] = {}
        for r in entry.pending:
            t = transport_for(_domain(r.addr), relay.downstream, relay.transport)
            groups.setdefault(t, []).append(r)
        errors: list[str] = []
        succeeded: list[dsnqueue.Delivered] = []  # for NOTIFY=SUCCESS
        for transport, rcpts in groups.items():
            try:
                got, error, success, remote = await self._send(entry, transport, rcpts)
            except Exception as e:  # a bug or a local failure: these recipients stay pending
                log.exception("delivery to %s failed (qid %s)", transport, entry.qid)
                error, success, remote = f"local error: {type(e).__name__}", None, None
                got = {r.addr: ("pending", f"451 4.3.0 {error}") for r in rcpts}
            if error:
                errors.append(f"{transport}: {error}")
            if success is not None:  # ours to report (the downstream could not be asked)
                succeeded += [(r, success, got[r.addr][1], remote) for r in rcpts
                              if got.get(r.addr, ("pending", None))[0] == "delivered"]
            if any(state != "pending" for state, _ in got.values()):
                # Final outcomes are saved at once: a crash now must not deliver them again.
                # When this made every recipient delivered, the removal below is that record
                # (a crash before it redelivers either way): no rewrite, two fsyncs fewer.
                entry = entry.with_recipient_results(got, remote)
                got = {}
                if not (entry.done and all(r.state == "delivered" for r in entry.recipients)):
                    await self._save(entry, area)
            entry = entry.with_recipient_results(got, remote)
        if succeeded:
            await self._report_success(entry, succeeded)
        now = time.time()
        expired = now - entry.arrival >= self.policy.queue.max_lifetime_s
        if expired and entry.pending:
            entry = entry.with_recipient_results(
                {r.addr: ("failed", f"451 4.4.7 delivery time expired (last: "
                                    f"{r.last_reply or 'no answer'})"[:300])
                 for r in entry.pending})
        if entry.done:
            try:
                note = await self._bounce(entry, now)
            except (OSError, SpoolError) as e:  # e.g. a full spool: keep the outcomes (no
                # second copy for the delivered recipients) and retry only the DSN later
                log.error("DSN for %s not queued: %s", entry.qid, e)
                errors.append(f"DSN not queued: {e}")
            else:
                self._latest[entry.qid] = entry
                await self.spool.remove_async(entry.qid, self.syncer)
                self._forget(entry.qid)
                self._log(entry, "done", now, errors, dsn_note=note)
                return
        entry = entry.with_retry(now + backoff_s(entry.attempts + 1, self.policy.queue),
                                 _last_error(entry, errors))
        entry = await self._warn_delay(entry, now)
        await self._save(entry, area)
        if area == "active":
            await asyncio.to_thread(self.spool.move, entry.qid, "active", "deferred")
        self._forget(entry.qid)
        self._log(entry, "deferred", now, errors)

    async def _save(self, entry: QueueEntry, area: str) -> None:
        self._latest[entry.qid] = entry  # kept if the write fails (see _attempt)
        await asyncio.to_thread(self.spool.update, entry, area)  # type: ignore[arg-type]

    def _forget(self, qid: str) -> None:
        self._latest.pop(qid, None)
        self._not_before.pop(qid, None)

    async def _send(self, entry: QueueEntry, t: Transport, rcpts: list[Recipient]
                    ) -> tuple[Results, str | None, dsn.Action | None, str | None]:
        """One delivery attempt to one transport. Temporary trouble leaves recipients pending.
        Also the success DSN action its deliveries owe (``dsn.success_action``) and the server
        that answered (its Remote-MTA; None for a Maildir)."""
        if t.kind == "maildir":
            return (*await self._send_maildir(entry, t, rcpts), "delivered", None)
        out: Results = {}
        success: dsn.Action | None = None
        remote: str | None = None
        try:
            async with self.pool.session(t) as client:
                success = dsn.success_action(t.kind, client.extensions)
                remote = client.remote_name
                return (*await self._transaction(client, entry, rcpts, out), success, remote)
        except RelayError as e:
            for x in rcpts:
                out.setdefault(x.addr, ("failed" if e.permanent else "pending",
                                        f"{e.code} {e.status} {e.text or e}"[:300]))
            return out, str(e), success, remote

    async def _transaction(self, client: DownstreamClient, entry: QueueEntry,
                           rcpts: list[Recipient], out: Results) -> tuple[Results, str | None]:
        """MAIL, RCPTs, DATA on a connected client; a 4xx/5xx reply is a result, not an error."""
        ext = client.extensions
        if "SMTPUTF8" in entry.mail_params and "SMTPUTF8" not in ext:  # RFC 6531 3.4
            return {x.addr: ("failed", "553 5.6.7 downstream does not support SMTPUTF8")
                    for x in rcpts}, None
        params = [p for p in entry.mail_params
                  if p.split("=")[0].upper() in ext
                  or (p.upper().startswith("BODY=") and "8BITMIME" in ext)]
        if "DSN" in ext:  # the downstream takes over the DSN duty for what it accepts
            params += dsnparams.mail_dsn_params(entry.ret, entry.envid)
        envelope = [(x.addr, dsnparams.rcpt_dsn_params(x.notify, x.orcpt)
                     if "DSN" in ext else []) for x in rcpts]
        data: Reply | None = None  # the reply to a DATA pipelined with the envelope
        if "PIPELINING" in ext:  # MAIL, RCPTs and DATA in one round trip (RFC 2920)
            mail, rcpt_replies, data = await client.envelope_data(entry.sender, params, envelope)
        else:
            mail, rcpt_replies = await client.envelope(entry.sender, params, envelope)
        if mail.code == 503:  # "bad sequence" at MAIL: the session, not the message, is wrong
            # (a 503 to RCPT may be a server's policy refusal: that one is final) — never
            # bounce for it; drop this connection and try again later
            raise RelayTempError(f"downstream session out of step: {_text(mail)}",
                                 code=451, status="4.4.0", text=_text(mail))
        if not mail.is_ok:
            state: RecipientState = "failed" if mail.is_perm else "pending"
            return {x.addr: (state, _text(mail)) for x in rcpts}, None
        accepted: list[Recipient] = []
        for x, reply in zip(rcpts, rcpt_replies, strict=True):
            if reply.is_ok:
                accepted.append(x)
            else:
                out[x.addr] = ("failed" if reply.is_perm else "pending", _text(reply))
        if accepted:
            with self.spool.open_outgoing(entry) as f:  # read on the loop, as sent
                if data is None:
                    replies = await client.data(_read(f), accepted_rcpts=len(accepted))
                else:
                    replies = await client.after_data(data, _read(f),
                                                      accepted_rcpts=len(accepted))
            if len(replies) == 1 and len(accepted) > 1:
                replies = replies * len(accepted)
            for x, reply in zip(accepted, replies, strict=False):
                out[x.addr] = ("delivered" if reply.is_ok else
                               "failed" if reply.is_perm else "pending", _text(reply))
        return out, None

    async def _send_maildir(self, entry: QueueEntry, t: Transport, rcpts: list[Recipient]
                            ) -> tuple[Results, str | None]:
        assert t.path is not None
        out: Results = {}
        error = None
        for x in rcpts:
            head = (f"Return-Path: <{entry.sender}>\r\nDelivered-To: {x.addr}\r\n").encode()
            try:
                with await asyncio.to_thread(self.spool.open_outgoing, entry) as f:
                    await asyncio.to_thread(maildir.deliver, t.path,
                                            _chain(head, _read(f)), entry.qid)
                out[x.addr] = ("delivered", f"maildir {t.path}")
            except OSError as e:
                error = f"maildir {t.path}: {e}"
                out[x.addr] = ("pending", error)
        return out, error

    async def _warn_delay(self, entry: QueueEntry, now: float) -> QueueEntry:
        """Once per message, after ``queue.delay_warning_s``: a "delayed" DSN for the pending
        recipients that asked for one (NOTIFY=DELAY, or no NOTIFY: RFC 3461 4.1 leaves that
        to the MTA, and an admin who sets a delay warning wants it)."""
        q = self.policy.queue
        if q.delay_warning_s <= 0 or entry.delay_warned is not None \
                or now - entry.arrival < q.delay_warning_s:
            return entry
        warn = [r for r in entry.pending
                if dsn.wants_dsn(entry.sender, r.notify, "delayed", delay_by_default=True)]
        try:
            if warn:
                await self._send_dsn(entry, now, "delayed", warn)
        except (OSError, SpoolError) as e:
            log.error("delay DSN for %s not queued: %s", entry.qid, e)
            return entry
        return replace(entry, delay_warned=now)

    async def _bounce(self, entry: QueueEntry, now: float) -> str | None:
        """Queue the DSN for the failed recipients that want one; returns its qid, or why none
        was sent (None when nothing failed). OSError/SpoolError: try again later."""
        failed = [r for r in entry.recipients if r.state == "failed"
                  and dsn.wants_dsn(entry.sender, r.notify, "failed")]
        if not failed:
            if not any(r.state == "failed" for r in entry.recipients):
                return None
            return "not sent: null sender" if not entry.sender else "not sent: NOTIFY"
        return await self._send_dsn(entry, now, "failed", failed)

    async def _send_dsn(self, entry: QueueEntry, now: float, action: dsn.Action,
                        rcpts: list[Recipient]) -> str:
        until = entry.arrival + self.policy.queue.max_lifetime_s if action == "delayed" else None
        try:
            statuses = [dsn.RecipientStatus(
                recipient=r.addr, action=action, status=_status_of(r.last_reply, action),
                original_recipient=r.orcpt, diagnostic=f"smtp; {r.last_reply}" if r.last_reply
                else None, remote_mta=dsnqueue.mta_name(r.remote_mta) if r.remote_mta else None,
                last_attempt=now, will_retry_until=until) for r in rcpts]
        except dsn.DsnError as e:  # cannot be built, now or later: say so, do not retry
            log.error("DSN for %s cannot be built: %s", entry.qid, e)
            return f"not sent: {e}"
        qid = await dsnqueue.queue_dsn(self.spool, entry, self.policy.hostname, statuses,
                                       lambda: self.spool.open_outgoing(entry), now)
        if not qid.startswith("not sent"):
            self.kick(qid)
        return qid

    async def _report_success(self, entry: QueueEntry,
                              delivered: list[dsnqueue.Delivered]) -> None:
        """The success DSN owed for this attempt's deliveries (``dsnqueue``: NOTIFY=SUCCESS and
        a downstream that could not be asked for it). Not queued: logged; the deliveries
        stand."""
        try:
            qid = await dsnqueue.report_success(self.spool, entry, self.policy.hostname,
                                                delivered, lambda: self.spool.open_outgoing(entry))
        except (OSError, SpoolError) as e:
            log.error("success DSN for %s not queued: %s", entry.qid, e)
            return
        if qid is not None and not qid.startswith("not sent"):
            self.kick(qid)

    def _log(self, entry: QueueEntry, outcome: str, now: float, errors: list[str],
             dsn_note: str | None = None) -> None:
        event(log, "delivery", qid=entry.qid, outcome=outcome, attempts=entry.attempts,
              sender=entry.sender or "<>",
              rcpts={r.addr: f"{r.state}: {r.last_reply or ''}"[:160] for r in entry.recipients},
              next_attempt=round(entry.next_attempt - now, 1) if outcome == "deferred" else None,
              errors=errors or None, dsn=dsn_note)


def _last_error(entry: QueueEntry, errors: list[str]) -> str | None:
    """Why the message is deferred: the transport errors, else (a 4xx reply, no error raised)
    the replies of the recipients still pending."""
    text = "; ".join(errors) or "; ".join(f"<{r.addr}>: {r.last_reply}" for r in entry.pending
                                          if r.last_reply)
    return text[:500] or None


def _text(reply: object) -> str:
    code, status, text = (getattr(reply, k) for k in ("code", "status", "text"))
    return f"{code} {status} {text}".strip()[:300]


def _status_of(last_reply: str | None, action: str = "failed") -> str:
    """The RFC 3463 status in a recorded reply ("550 5.1.1 ..."), for the DSN."""
    m = re.search(r"\b([45]\.\d{1,3}\.\d{1,3})\b", last_reply or "")
    if action == "delayed":  # a delay is temporary by definition
        return m.group(1) if m and m.group(1)[0] == "4" else "4.0.0"
    return m.group(1) if m else "5.0.0"


def _read(f: object, block: int = 256 * 1024) -> Iterator[bytes]:
    while chunk := f.read(block):  # type: ignore[attr-defined]
        yield chunk


def _chain(head: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest
