"""The policy side of an SMTP session: runs each stage's filters, decides, talks to the relay and
writes the per-message log line. The SMTP front end (gateway/smtp/server.py) owns the protocol;
it asks the engine what to answer. One Engine exists per loaded policy; a reload makes a new one
for new connections while old sessions finish on the old one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import dsnqueue, quarantine
from gateway import replies as R
from gateway.checkgate import CheckGate
from gateway.decide import Decision, Scorecard, decide
from gateway.dnsresolver import LimitedResolver
from gateway.dsn import Action as DsnAction
from gateway.durable import Syncer
from gateway.edits import (
    TraceInfo,
    build_headers,
    message_chunks,
    queued_form,
    received_value,
)
from gateway.errors import SpoolError
from gateway.filterapi import Action, Client, Decided, FilterContext, RemoveHeader, Stage
from gateway.logs import event
from gateway.message import Message
from gateway.mimebounds import MimeLimits
from gateway.pipeline import FilterOutcome, Pipeline, collect, decided, take_done
from gateway.policy.schema import Policy, PolicyClass
from gateway.queue_entry import QueueEntry, min_free_bytes
from gateway.queue_entry import Recipient as QRecipient
from gateway.registry import LoadedFilter
from gateway.relay.pool import DownstreamPool
from gateway.relay.proxy import ProxyRelay
from gateway.relay.transport import transport_for
from gateway.replies import Reply
from gateway.services import Services
from gateway.smtp import dsnparams
from gateway.smtp.address import Address
from gateway.spool import Spool

log = logging.getLogger("mailgate.message")

RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
SPLIT_CLASS = Reply(452, "4.5.3", "Recipient needs a separate transaction (different policy), "
                                  "send it again")
SPLIT_TRANSPORT = Reply(452, "4.5.3", "Recipient needs a separate transaction (different "
                                      "destination), send it again")


@dataclass
class SessionState:
    """What the engine keeps about one connection."""

    sid: str
    client_ip: str
    client_port: int
    trusted: bool
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    outcomes: list[FilterOutcome] = field(default_factory=list)  # connect + helo stages
    delayed: Decision | None = None  # a HELO-stage refusal, given at MAIL
    transactions: int = 0
    accepted: int = 0
    refused: int = 0

    def client(self) -> Client:
        return Client(self.client_ip, self.client_port, self.helo, self.tls, self.trusted)


@dataclass
class Transaction:
    qid: str
    sender: Address
    mail_params: list[str]  # SIZE, BODY, SMTPUTF8 as sent
    utf8: bool = False
    ret: str | None = None  # RFC 3461 RET (FULL/HDRS)
    envid: str | None = None  # RFC 3461 ENVID, decoded
    rcpts: list[Address] = field(default_factory=list)
    dsn: dict[str, tuple[frozenset[str] | None, str | None]] = field(default_factory=dict)
    rcpt_refused: int = 0
    rcpt_refusal: tuple[str, Reply] | None = None  # (by, reply) of the last refused RCPT
    refused_outcomes: list[FilterOutcome] = field(default_factory=list)  # its filters' outcomes
    cls: PolicyClass | None = None
    relay: ProxyRelay | None = None
    scorecard: Scorecard = field(default_factory=Scorecard)
    started: float = field(default_factory=time.monotonic)
    size: int = 0
    decision: Decision | None = None
    queued: str | None = None  # queue mode: what became of the message ("queued", ...)
    sign_error: str | None = None  # a signer (on_sign) failed: the message was not sent on
    dns: LimitedResolver | None = None  # the message's DNS lookups, limited (made at MAIL)
    check_wait_s: float = 0.0  # how long its end-of-data checks waited for a slot (CheckGate)
    # background filters started at MAIL, collected at end of data (or cancelled on abort)
    pending: dict[str, asyncio.Task[FilterOutcome]] = field(default_factory=dict)


OnCommit = Callable[[str, QueueEntry | None, int | None], None]


class Engine:
    def __init__(self, policy: Policy, chain: Iterable[LoadedFilter], services: Services
                 ) -> None:
        self.policy = policy
        self.warnings: tuple[str, ...] = ()  # the policy's lint warnings (load_engine)
        self.pipeline = Pipeline(chain)
        self.services = services
        self.helo_name = policy.relay.helo_name or policy.hostname
        self.spool: Spool | None = None  # queue mode commits here (attach_queue)
        # called with each committed qid, its entry and its claim's descriptor (or Nones)
        self.on_commit: OnCommit | None = None
        self.queue_mode = policy.relay.mode == "queue"
        self.background = background_filters(policy, self.pipeline.chain)
        self._decided_tasks: set[asyncio.Task[None]] = set()
        self.min_free_bytes = min_free_bytes(policy.limits.max_message_bytes)
        lim = policy.limits  # the MIME parse's structural bounds (gateway.mimebounds)
        self.mime_limits = MimeLimits(lim.max_mime_depth, lim.max_mime_parts,
                                      lim.max_mime_headers, lim.max_mime_encoded_words)
        self._room_until = 0.0  # loop time until which the last free-space check holds
        self.syncer = Syncer()  # the fsyncs of concurrent commits, batched
        # end-of-data checks at once (limits.max_concurrent_checks): bounds the memory of the
        # message-stage filters; without any, there is nothing to bound
        self.checks = CheckGate(policy.limits.max_concurrent_checks
                                if self.pipeline.has(Stage.MESSAGE) else None,
                                policy.limits.check_wait_s)
        # proxy mode: downstream connections reused between client transactions
        self.proxy_pool = DownstreamPool(policy.relay, self.helo_name,
                                         max_per_destination=policy.queue.max_per_destination,
                                         idle_s=policy.relay.connection_reuse_s,
                                         name="proxy-pool")

    async def close(self) -> None:
        """This engine is done with (shutdown, or replaced by a reload): close the idle
        downstream connections; the ones in use are closed when their transactions end."""
        await self.proxy_pool.close()

    def attach_queue(self, spool: Spool, on_commit: OnCommit) -> None:
        """Give the engine the spool it commits to and what to call with each committed qid."""
        self.spool, self.on_commit = spool, on_commit

    def command_budget_s(self, verb: str) -> float:
        """The deadline for handling one command: ``limits.command_timeout_s`` for our own
        work, plus the relay's own step timeouts where the command waits on the downstream
        (so a slow downstream yields the relay's 451 4.4.x, not a session timeout)."""
        own, r = self.policy.limits.command_timeout_s, self.policy.relay
        if verb == "RCPT":  # may connect, greet, EHLO, MAIL and RCPT downstream
            return own + r.connect_timeout_s + 3 * r.command_timeout_s
        if verb == "DATA":  # end of data: the message stage, then the whole transfer
            return own + r.data_timeout_s
        return own

    # -- contexts -------------------------------------------------------------------------
    def _ctx(self, stage: Stage, state: SessionState, txn: Transaction | None, **kw: Any
             ) -> FilterContext:
        outcomes = state.outcomes + (txn.scorecard.outcomes if txn else [])
        results = {o.name: o.result for o in outcomes}
        if txn is None:
            return FilterContext(**{"stage": stage, "qid": state.sid, "client": state.client(),
                                    "results": results, **kw})
        if txn.dns is None and self.services.resolver is not None:
            txn.dns = self.services.resolver.limited()
        return FilterContext(**{
            "stage": stage, "qid": txn.qid, "client": state.client(), "results": results,
            "sender": txn.sender, "recipients": tuple(txn.rcpts), "dns": txn.dns,
            "sender_params": _params_dict(txn.mail_params),
            "policy_class": (txn.cls or self.policy.default_class).name, **kw})

    async def _run_stage(self, stage: Stage, state: SessionState, txn: Transaction | None, *,
                         skip: frozenset[str] = frozenset(),
                         background: frozenset[str] = frozenset(),
                         pending: dict[str, asyncio.Task[FilterOutcome]] | None = None,
                         **ctx: Any) -> dict[str, FilterOutcome]:
        """``Pipeline.run_stage`` on a context with ``ctx``'s fields; none is made for a stage
        no filter runs at."""
        if not self.pipeline.has(stage):
            return {}
        return await self.pipeline.run_stage(stage, self._ctx(stage, state, txn, **ctx),
                                             skip, background, pending)

    def _symbols(self, state: SessionState, txn: Transaction | None,
                 extra: Iterable[FilterOutcome] = ()) -> list[FilterOutcome]:
        return [*state.outcomes, *(txn.scorecard.outcomes if txn else []), *extra]

    # -- stages ---------------------------------------------------------------------------
    async def on_connect(self, state: SessionState) -> Reply | None:
        """None to greet normally, or the refusal to greet with (554)."""
        out = await self._run_stage(Stage.CONNECT, state, None)
        state.outcomes.extend(out.values())
        d = self._early(state, None, out.values(), Stage.CONNECT)
        if d is not None:
            assert d.reply is not None
            # RFC 5321 3.1, 4.3.2: in place of the 220 greeting only 554 (then wait for QUIT)
            # or 421 (then close) may be sent, whatever reply the verdict or rule carried.
            reply = Reply(554 if d.reply.is_perm else 421, d.reply.status, d.reply.text)
            self._log_refusal(state, Stage.CONNECT, dataclasses.replace(d, reply=reply))
            return reply.with_qid(state.sid)
        return None

    async def on_helo(self, state: SessionState) -> None:
        state.outcomes = [o for o in state.outcomes if o.stage is Stage.CONNECT]
        state.delayed = None
        out = await self._run_stage(Stage.HELO, state, None)
        state.outcomes.extend(out.values())
        state.delayed = self._early(state, None, out.values(), Stage.HELO)

    async def on_mail(self, state: SessionState, txn: Transaction) -> Reply:
        state.transactions += 1
        if state.delayed is not None:
            txn.decision = state.delayed
            assert state.delayed.reply is not None
            return state.delayed.reply.with_qid(txn.qid)
        if self.queue_mode and self.spool is not None and not await self._has_room():
            log.error("spool %s: less than %d bytes free, refusing mail", self.spool.root,
                      self.min_free_bytes)
            return Reply(452, "4.3.1", f"Insufficient system storage ({txn.qid})")
        out = await self._run_stage(Stage.MAIL, state, txn, background=self.background,
                                    pending=txn.pending)
        txn.scorecard.add(out.values())
        d = self._early(state, txn, out.values(), Stage.MAIL)
        if d is not None:
            txn.decision = d
            assert d.reply is not None
            return d.reply.with_qid(txn.qid)
        return R.SENDER_OK

    async def on_rcpt(self, state: SessionState, txn: Transaction, rcpt: Address,
                      notify: frozenset[str] | None = None, orcpt: str | None = None) -> Reply:
        """``notify``/``orcpt``: the recipient's RFC 3461 NOTIFY and (decoded) ORCPT."""
        txn.refused_outcomes = []
        reply, by = await self._rcpt(state, txn, rcpt, notify, orcpt)
        if not reply.is_ok:
            txn.rcpt_refused += 1
            if not reply.text.endswith(f"({txn.qid})"):  # every refusal ends with the qid
                reply = reply.with_qid(txn.qid)
            txn.rcpt_refusal = (by, reply)
        return reply

    async def _rcpt(self, state: SessionState, txn: Transaction, rcpt: Address,
                    notify: frozenset[str] | None, orcpt: str | None) -> tuple[Reply, str]:
        """The reply for one recipient, and (for a refusal) what chose it, for the log."""
        p = self.policy
        if any(r.addr == rcpt.addr for r in txn.rcpts):  # once is enough (LMTP would deliver
            return Reply(250, "2.1.5", "Recipient ok (duplicate)"), ""  # twice)
        local = not rcpt.domain or p.is_local_domain(rcpt.domain_key)
        if not state.trusted:
            tricks = rcpt.routing_tricks
            if tricks:
                return Reply(550, "5.7.1", f"Relay access denied: {', '.join(tricks)} "
                                           f"not accepted ({txn.qid})"), "relay-denied"
            if not local:
                return RELAY_DENIED.with_qid(txn.qid), "relay-denied"
        if len(txn.rcpts) >= p.limits.max_recipients:
            return TOO_MANY_RCPTS, "limit:max_recipients"
        cls = self.policy.class_for_domain(rcpt.domain_key) if rcpt.domain else \
            (txn.cls or p.default_class)
        if txn.cls is not None and cls.name != txn.cls.name:
            return SPLIT_CLASS, "split:class"
        transport = transport_for(rcpt.domain_key, p.relay.downstream, p.relay.transport)
        current = txn.relay.transport if txn.relay is not None else None
        if current is not None and transport != current:
            return SPLIT_TRANSPORT, "split:transport"
        out = await self._run_stage(Stage.RCPT, state, txn, skip=cls.skip_filters, rcpt=rcpt,
                                    policy_class=cls.name)
        d = self._early(state, txn, out.values(), Stage.RCPT, cls)
        if d is not None:
            assert d.reply is not None
            txn.refused_outcomes = list(out.values())
            return d.reply.with_qid(txn.qid), d.by
        if self.queue_mode:  # store and forward: the queue manager routes each recipient
            txn.rcpts.append(rcpt)
            txn.dsn[rcpt.addr] = (notify, orcpt)
            txn.cls = cls
            txn.scorecard.add(out.values())
            return R.RCPT_OK, ""
        if txn.relay is None:
            txn.relay = ProxyRelay(transport, p.relay, self.proxy_pool, txn.qid)
        reply = await txn.relay.add_rcpt(
            txn.sender, txn.mail_params + dsnparams.mail_dsn_params(txn.ret, txn.envid), rcpt,
            dsnparams.rcpt_dsn_params(notify, orcpt))
        if reply.is_ok:
            txn.rcpts.append(rcpt)
            txn.dsn[rcpt.addr] = (notify, orcpt)  # kept should the message be quarantined
            txn.cls = cls
            txn.scorecard.add(out.values())
            return R.RCPT_OK, ""
        return reply, "downstream"

    async def _has_room(self) -> bool:
        """The spool's free-space check for MAIL: asked of the filesystem at most every
        ROOM_CHECK_S while there is room, at every MAIL while there is not. (A disk that fills
        in between is still caught: the DATA write or the commit fails with a 4xx.)"""
        assert self.spool is not None
        now = asyncio.get_running_loop().time()
        if now < self._room_until:
            return True
        ok = await asyncio.to_thread(self.spool.has_room, self.min_free_bytes)
        self._room_until = now + ROOM_CHECK_S if ok else 0.0
        return ok

    def _early(self, state: SessionState, txn: Transaction | None,
               stage_out: Iterable[FilterOutcome], stage: Stage,
               cls: PolicyClass | None = None) -> Decision | None:
        cls = cls or (txn.cls if txn and txn.cls else self.policy.default_class)
        stage_out = list(stage_out)
        syms = [s for o in self._symbols(state, txn, stage_out) for s in o.result.symbols]
        return decide(syms, stage_out, cls, stage, 0.0)

    async def on_data(self, state: SessionState, txn: Transaction, spool: Path, size: int,
                      head: bytes | None = None, spool_fd: int | None = None) -> Reply:
        """End of DATA: run the message stage, decide, act; returns the final reply. ``head``:
        the file's first bytes as DATA wrote them (``HeadCapture``), else they are read.
        ``spool_fd``: the DATA writer's descriptor of ``spool``, still open (the queue commit
        locks and fsyncs it: ``Spool.commit_async``)."""
        txn.size = size
        cls = txn.cls or self.policy.default_class
        # The checks, and in queue mode the commit, in one of the gate's slots; proxy mode's
        # relaying waits on the downstream and holds none.
        async with self.checks.slot() as txn.check_wait_s:
            message = (Message.from_head(spool, size, head, self.mime_limits)
                       if head is not None else
                       await asyncio.to_thread(Message.from_spool, spool, size, self.mime_limits))
            if txn.pending:  # background filters (SPF) ran while RCPT and DATA streamed in
                txn.scorecard.add(await collect(txn.pending))
            out = await self._run_stage(Stage.MESSAGE, state, txn, skip=cls.skip_filters,
                                        message=message)
            txn.scorecard.add(out.values())
            all_out = self._symbols(state, txn)
            card = Scorecard(all_out)
            score = card.score(cls)
            d = decide(card.symbols(cls), all_out, cls, Stage.MESSAGE, score)
            assert d is not None
            txn.decision = d
            if self.pipeline.has_deciders:
                self._tell_decided(state, txn, message, card, cls, d)
            if self.queue_mode:
                return await self._queue(state, txn, message, card, cls, d, spool_fd)
        relay = txn.relay
        assert relay is not None
        if d.action.refuses:
            await relay.abort()
            relay.last_result = "not relayed"
            assert d.reply is not None
            return d.reply.with_qid(txn.qid)
        if d.action is Action.DISCARD:
            await relay.abort()
            relay.last_result = "discarded"
            return Reply(250, "2.0.0", f"Ok: queued as {txn.qid}")
        headers = self._headers(state, txn, message, card, cls, d)
        if d.action is Action.QUARANTINE:
            await relay.abort()
            return await self._quarantine(state, txn, message, headers, card, cls)
        signed = await self._sign(state, txn, message, headers, cls)
        if isinstance(signed, Reply):
            await relay.abort()
            relay.last_result = "not relayed"
            return signed
        headers = signed
        reply = await relay.deliver(lambda rcpt: self._with_envelope(
            txn, rcpt, message_chunks(message, headers)))
        if reply.is_ok and (success := relay.success_action) is not None:
            await self._report_success(state, txn, message, success)
        return reply

    async def _report_success(self, state: SessionState, txn: Transaction, message: Message,
                              action: DsnAction) -> None:
        """Proxy mode, delivered: the success DSN owed to recipients with NOTIFY=SUCCESS when
        the downstream could not be asked for it (``gateway.dsnqueue``), queued for the queue
        manager. A failure is logged; the 250 stands (the message was delivered)."""
        if self.spool is None:
            return
        entry = _entry(state, txn, txn.size, time.time(), {"action": "dsn-source"})
        try:
            qid = await dsnqueue.report_success(
                self.spool, entry, self.policy.hostname,
                [(r, action, txn.relay.replies.get(r.addr) if txn.relay else None,
                  txn.relay.remote_name if txn.relay else None)
                 for r in entry.recipients], lambda: message.path.open("rb"))
        except (OSError, SpoolError) as e:
            log.error("success DSN for %s not queued: %s", txn.qid, e)
            return
        if qid is not None and not qid.startswith("not sent") and self.on_commit is not None:
            self.on_commit(qid, None, None)

    async def _queue(self, state: SessionState, txn: Transaction, message: Message,
                     card: Scorecard, cls: PolicyClass, d: Decision,
                     spool_fd: int | None = None) -> Reply:
        """Queue mode: the answer is ours. Accepted mail is committed durably (fsync) to the
        spool before the 250; the queue manager delivers it."""
        if d.action.refuses:
            txn.queued = "not queued"
            assert d.reply is not None
            return d.reply.with_qid(txn.qid)
        if d.action is Action.DISCARD:
            txn.queued = "discarded"
            return Reply(250, "2.0.0", f"Ok: queued as {txn.qid}")
        headers = self._headers(state, txn, message, card, cls, d)
        if d.action is Action.QUARANTINE:
            return await self._quarantine(state, txn, message, headers, card, cls)
        signed = await self._sign(state, txn, message, headers, cls)
        if isinstance(signed, Reply):
            txn.queued = "not queued"
            return signed
        headers = signed
        assert self.spool is not None
        entry: QueueEntry | None = None
        lock: int | None = None  # the committed message's claim, for the queue manager
        try:
            decision = {"action": d.action.value, "score": d.score, "by": d.by,
                        "class": cls.name, "symbols": [s.name for s in card.symbols(cls)]}
            form = queued_form(message, headers, MAX_PREPEND_BYTES)
            if form is not None:
                # The received file becomes the queue's data file as it is (a hard link, no
                # copy, no second inode); the new header lines travel in the metadata.
                entry = _entry(state, txn, message.size, time.time(), decision,
                               prepend=form[0], skip=form[1])
                lock = await self.spool.commit_async(
                    entry, message.path, self.syncer, link=True, fd=spool_fd,
                    keep_lock=self.on_commit is not None)
            else:
                await asyncio.to_thread(self._write_and_commit, state, txn, message, headers,
                                        decision)
        except (OSError, SpoolError) as e:
            log.error("queue commit failed (qid %s): %s", txn.qid, e)
            txn.queued = f"commit failed: {e}"
            return Reply(451, "4.3.0", f"Temporary local problem, try again later ({txn.qid})")
        txn.queued = "queued"
        if self.on_commit is not None:
            self.on_commit(txn.qid, entry, lock)
        return Reply(250, "2.0.0", f"Ok: queued as {txn.qid}")

    def _write_and_commit(self, state: SessionState, txn: Transaction, message: Message,
                          headers: bytes, decision: dict[str, Any]) -> None:
        """Queue a copy of the outgoing message (in a worker thread)."""
        assert self.spool is not None
        path = self.spool.incoming_path(txn.qid).with_suffix(".final")
        try:
            size = _write(path, message_chunks(message, headers))
            self.spool.commit(_entry(state, txn, size, time.time(), decision), path)
        finally:
            path.unlink(missing_ok=True)  # renamed away by a successful commit

    def _headers(self, state: SessionState, txn: Transaction, message: Message,
                 card: Scorecard, cls: PolicyClass, d: Decision) -> bytes:
        h = self.policy.headers
        edits = card.edits()
        if h.spam_headers:  # headers like ours from outside are forged: drop them
            edits.insert(0, RemoveHeader(h.spam_header_prefix, name_prefix=True))
        return build_headers(message, self._prepend(state, txn, card, cls, d), edits,
                             action=d.action, subject_tag=h.subject_tag)

    def _tell_decided(self, state: SessionState, txn: Transaction, message: Message,
                      card: Scorecard, cls: PolicyClass, d: Decision) -> None:
        """``on_decided`` hooks (e.g. Bayes auto-learn), in the background: never awaited."""
        what = Decided(d.action, d.score, d.by, {s.name: s.score for s in card.symbols(cls)})
        ctx = self._ctx(Stage.MESSAGE, state, txn, message=message)
        task = asyncio.create_task(decided(self.pipeline.chain, ctx, what, cls.skip_filters),
                                   name=f"decided:{txn.qid}")
        self._decided_tasks.add(task)
        task.add_done_callback(self._decided_tasks.discard)

    async def _sign(self, state: SessionState, txn: Transaction, message: Message,
                    headers: bytes, cls: PolicyClass) -> bytes | Reply:
        """The signers' headers (DKIM-Signature, ARC set) on top of the final header block,
        or a 451 when a signer failed and may not be skipped: mail never leaves half-signed."""
        if not self.pipeline.has_signers:
            return headers
        ctx = self._ctx(Stage.MESSAGE, state, txn, message=message)
        headers, error = await self.pipeline.sign(ctx, headers, skip=cls.skip_filters)
        if error is None:
            return headers
        txn.sign_error = error
        return Reply(451, "4.3.0", f"Temporary local problem, try again later ({txn.qid})")

    def _with_envelope(self, txn: Transaction, rcpt: Address | None, chunks: Iterable[bytes]
                       ) -> Iterable[bytes]:
        if rcpt is None:  # an SMTP/LMTP downstream gets the envelope in the protocol
            return chunks
        head = (f"Return-Path: <{txn.sender.addr}>\r\n"
                f"Delivered-To: {rcpt.addr}\r\n").encode()
        return _chain(head, chunks)

    def _prepend(self, state: SessionState, txn: Transaction, card: Scorecard,
                 cls: PolicyClass, d: Decision) -> list[tuple[str, str]]:
        h = self.policy.headers
        out: list[tuple[str, str]] = []
        if h.received:
            proto = ("UTF8SMTP" if txn.utf8 else "ESMTP" if state.esmtp else "SMTP") + \
                ("S" if state.tls else "")
            value = received_value(TraceInfo(self.policy.hostname, txn.qid, state.client_ip,
                                             state.helo, proto,
                                             txn.rcpts[0].addr if len(txn.rcpts) == 1 else None))
            out.append(("Received", " ".join(value.split())))
        if h.spam_headers:
            pre = h.spam_header_prefix
            t = cls.thresholds
            required_at = t.add_header if t.add_header is not None else t.reject
            flagged = d.action in (Action.ADD_HEADER, Action.REWRITE_SUBJECT, Action.QUARANTINE)
            syms = ",".join(s.name for s in card.symbols(cls))
            required = f"{required_at:g}" if required_at is not None else "-"
            out.append((f"{pre}Status", f"{'Yes' if flagged else 'No'}, score={d.score:g} "
                                        f"required={required} action={d.action.value}"))
            out.append((f"{pre}Score", f"{d.score:g}"))
            if syms:
                out.append((f"{pre}Symbols", syms))
        return out

    async def _quarantine(self, state: SessionState, txn: Transaction, message: Message,
                          headers: bytes, card: Scorecard, cls: PolicyClass) -> Reply:
        """Keep the message (as it would have been relayed) with its envelope, score, symbols
        and reason in the spool's hold/ area, indexed (gateway/quarantine.py), fsync'd before
        the 250 — in either relay mode. Any failure answers 451 and keeps nothing."""
        d = txn.decision
        assert d is not None
        if self.spool is None:
            log.error("quarantine impossible (qid %s): no spool attached", txn.qid)
            txn.queued = "quarantine failed: no spool"
            return Reply(451, "4.3.0", f"Temporary local problem, try again later ({txn.qid})")
        path = self.spool.incoming_path(txn.qid).with_suffix(".final")
        now = time.time()
        symbols = [quarantine.SymbolInfo(s.name, s.score, s.options) for s in card.symbols(cls)]
        try:
            size = await asyncio.to_thread(_write, path, message_chunks(message, headers))
            entry = _entry(state, txn, size, now,
                           quarantine.decision(d.action.value, d.score, d.by, cls.name,
                                               symbols, now))
            await asyncio.to_thread(quarantine.Quarantine(self.spool).store, entry, path)
        except (OSError, SpoolError) as e:
            path.unlink(missing_ok=True)
            log.error("quarantine write failed (qid %s): %s", txn.qid, e)
            txn.queued = f"quarantine failed: {e}"
            return Reply(451, "4.3.0", f"Temporary local problem, try again later ({txn.qid})")
        txn.queued = "quarantined"
        return Reply(250, "2.0.0", f"Ok: queued as {txn.qid}")

    # -- logging --------------------------------------------------------------------------
    def log_transaction(self, state: SessionState, txn: Transaction, reply: Reply | None,
                        outcome: str) -> None:
        """The one structured line per message (every transaction that got past MAIL)."""
        cls = txn.cls or self.policy.default_class
        d = txn.decision
        extra: list[FilterOutcome] = []
        if txn.pending:  # an aborted transaction: what finished is logged, the rest cancelled
            txn.scorecard.add(take_done(txn.pending))
        action, by = (d.action.value, d.by) if d else (outcome, outcome)
        if d is None and reply is None and not txn.rcpts and txn.rcpt_refusal is not None:
            # Every recipient was refused and the client gave up: the transaction was refused
            # at RCPT; log it as such (what refused it, the reply, the symbols behind it).
            by, reply = txn.rcpt_refusal
            action = (Action.REJECT if reply.is_perm else Action.TEMPFAIL).value
            extra = txn.refused_outcomes
        card = Scorecard(self._symbols(state, txn, extra))
        syms = [f"{s.name}({s.score:g})" + (f"[{'|'.join(s.options)[:80]}]" if s.options else "")
                for s in card.symbols(cls)]
        if reply is not None and reply.is_ok and d is not None:
            state.accepted += 1
        elif outcome != "aborted" or reply is not None:
            state.refused += 1
        event(log, "message", qid=txn.qid, sid=state.sid, client=state.client_ip,
              helo=state.helo, sender=txn.sender.addr or "<>",
              rcpts=[r.addr for r in txn.rcpts], rcpt_refused=txn.rcpt_refused,
              size=txn.size, score=card.score(cls), action=action, by=by,
              policy_class=cls.name, symbols=syms,
              stage_ms=card.stage_ms(), check_wait_ms=round(txn.check_wait_s * 1000, 1),
              filter_errors=card.errors() or None,
              sign_error=txn.sign_error,
              relay=txn.queued or (txn.relay.last_result if txn.relay else "not relayed"),
              reply=reply.render().replace("\r\n", " | ") if reply else None,
              ms=round((time.monotonic() - txn.started) * 1000, 1))

    def _log_refusal(self, state: SessionState, stage: Stage, d: Decision) -> None:
        event(log, "refused", sid=state.sid, client=state.client_ip, stage=stage.value,
              by=d.by, reply=d.reply.render() if d.reply else None)


def _entry(state: SessionState, txn: Transaction, size: int, arrival: float,
           decision: dict[str, Any], *, prepend: bytes = b"", skip: int = 0) -> QueueEntry:
    """The queue record of an accepted transaction (queued or quarantined)."""
    return QueueEntry(prepend=prepend, skip=skip,
        qid=txn.qid, sender=txn.sender.addr, mail_params=tuple(txn.mail_params),
        envid=txn.envid, ret=txn.ret,
        recipients=tuple(QRecipient(addr=r.addr, notify=txn.dsn[r.addr][0],
                                    orcpt=txn.dsn[r.addr][1]) for r in txn.rcpts),
        arrival=arrival, size=size, client_ip=state.client_ip, helo=state.helo or "",
        next_attempt=0.0, decision=decision)


def background_filters(policy: Policy, chain: Iterable[LoadedFilter]) -> frozenset[str]:
    """MAIL-stage filters that may run in the background (class attribute ``background``,
    e.g. spf): started at MAIL, their result awaited only at end of data. A filter stays in the
    foreground when a rule that may fire before the message stage (``stage`` connect … rcpt,
    in any policy class) names one of its symbols (``NAME_…``): that rule needs it at once."""
    early = {s for cls in (policy.default_class, *policy.classes) for r in cls.rules
             if r.stage.order < Stage.MESSAGE.order
             for s in (*r.if_any, *r.if_all, *r.unless_any)}
    out = set()
    for f in chain:
        if Stage.MAIL not in f.stages or not getattr(f.instance, "background", False):
            continue
        prefix = f.name.upper() + "_"
        if not any(s.startswith(prefix) for s in early):
            out.add(f.name)
    return frozenset(out)


ROOM_CHECK_S = 0.5  # how long a passed free-space check stands (see Engine._has_room)

# Above this, an edited header block is not kept in the queue's metadata (read by every queue
# scan, rewritten on every retry): the message is written out with it instead.
MAX_PREPEND_BYTES = 16 * 1024


def _write(path: Path, chunks: Iterator[bytes]) -> int:
    """Write the outgoing message for the queue; returns its size (commit fsyncs it)."""
    size = 0
    with path.open("xb", buffering=256 * 1024) as f:
        for chunk in chunks:
            f.write(chunk)
            size += len(chunk)
    return size


def _chain(head: bytes, rest: Iterable[bytes]) -> Iterable[bytes]:
    yield head
    yield from rest


def _params_dict(params: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in params:
        k, eq, v = p.partition("=")
        out[k.upper()] = v if eq else None
    return out
