"""Proxy-mode relay (Postfix ``smtpd_proxy_filter`` semantics): one downstream transaction in
lockstep with the client's. RCPT is forwarded as it arrives (the downstream's per-recipient
answer goes back to the client; the first one in the same write as MAIL when the downstream
offers PIPELINING, RFC 2920), the message after the message stage; the client gets 250 only
when the downstream said 250. A downstream that is down, slow or drops the connection gives
``451 4.4.x`` — never a 250 for mail that was not delivered.

Downstream connections come from a ``DownstreamPool`` and go back to it after the transaction
(``relay.connection_reuse_s``): the next client's transaction starts with MAIL on the same
connection. A reused connection that turns out dead at MAIL (the downstream closed it while it
waited) is replaced by a new one, once, so reuse never costs the client a 451.

For ``maildir:`` the "downstream" is a local Maildir: each recipient's copy is fsync'd before the
250.

DSN: NOTIFY/ORCPT/RET/ENVID go on to a downstream that offers DSN (it reports success itself);
for one that does not, or a Maildir, ``success_action`` says which success report the engine
queues for recipients that asked for one (``gateway.dsnqueue``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway import replies as R
from gateway.dsn import Action as DsnAction
from gateway.dsn import success_action
from gateway.errors import RelayError
from gateway.policy.schema import RelayConfig
from gateway.relay import maildir
from gateway.relay.client import DownstreamClient
from gateway.relay.pool import DownstreamPool
from gateway.relay.transport import Transport
from gateway.replies import Reply
from gateway.smtp.address import Address

log = logging.getLogger("mailgate.relay")

DOWNSTREAM_DOWN = Reply(451, "4.4.1", "Downstream server unavailable, try again later")
DOWNSTREAM_LOST = Reply(451, "4.4.2", "Downstream connection lost, try again later")
LOCAL_WRITE_FAILED = Reply(451, "4.3.0", "Local delivery failed, try again later")
NO_SMTPUTF8 = Reply(553, "5.6.7", "Downstream does not support SMTPUTF8")


def _temp(e: RelayError) -> Reply:
    return DOWNSTREAM_DOWN if e.status == "4.4.1" else DOWNSTREAM_LOST


def _closing(reply: Reply) -> bool:
    """A 421 closes the downstream connection; the client's own session goes on, so it must
    not see a 421 (RFC 5321 3.8): it gets 451 4.4.2 instead."""
    return reply.code == 421


@dataclass
class ProxyRelay:
    """One transaction's downstream side. Not reusable across transactions (its connection
    is: ``close`` and ``abort`` give it back to ``pool``)."""

    transport: Transport
    cfg: RelayConfig
    pool: DownstreamPool
    qid: str
    client: DownstreamClient | None = None
    mail_reply: Reply | None = None
    accepted: list[Address] = field(default_factory=list)
    last_result: str = "not relayed"
    extensions: frozenset[str] = frozenset()  # the downstream's EHLO/LHLO keywords
    # after a delivery: each recipient's end-of-data reply ("250 2.0.0 Ok"), for a DSN
    replies: dict[str, str] = field(default_factory=dict)
    remote_name: str | None = None  # ... and the server that gave them (DSN Remote-MTA)

    @property
    def success_action(self) -> DsnAction | None:
        """The success DSN this transaction's delivery owes to recipients with NOTIFY=SUCCESS:
        None when the downstream offers DSN (it got NOTIFY and reports itself)."""
        return success_action(self.transport.kind, self.extensions)

    async def _open(self, sender: Address, mail_params: list[str], rcpt: Address,
                    rcpt_params: list[str]) -> tuple[Reply, Reply | None]:
        """A connection and MAIL on it; with PIPELINING the first RCPT goes in the same
        write (RFC 2920). Returns the MAIL reply and, when it was sent along and MAIL was
        accepted, the RCPT reply."""
        t = self.transport
        reuse = True
        while True:
            try:
                client, reused = await self.pool.acquire(t, reuse=reuse)
            except RelayError as e:
                log.warning("downstream %s: %s (qid %s)", t, e, self.qid)
                self.last_result = f"connect failed: {e}"
                return (DOWNSTREAM_DOWN if not e.permanent else Reply(e.code, e.status, e.text),
                        None)
            self.client = client
            params: list[str] = []
            ext = client.extensions
            self.extensions = frozenset(ext)
            for p in mail_params:
                key = p.split("=", 1)[0].upper()
                if key == "SMTPUTF8" and "SMTPUTF8" not in ext:
                    await self.abort()
                    return NO_SMTPUTF8, None
                if key == "BODY" and "8BITMIME" not in ext:
                    continue
                if key in ("SIZE", "BODY", "SMTPUTF8") and (key != "SIZE" or "SIZE" in ext):
                    params.append(p)
                elif key in ("RET", "ENVID") and "DSN" in ext:
                    params.append(p)
            first: Reply | None = None
            try:
                if "PIPELINING" in ext:
                    reply, replies = await client.envelope(
                        sender.addr, params, [(rcpt.addr, rcpt_params if "DSN" in ext else [])])
                    first = replies[0] if replies else None
                else:
                    reply = await client.mail(sender.addr, params)
            except RelayError as e:
                self.client = None
                if not reused:
                    self.last_result = f"MAIL failed: {e}"
                    return _temp(e), None
                lost = str(e)
            else:
                if not _closing(reply):
                    if not reply.is_ok:
                        self.last_result = f"MAIL {reply.code} {reply.status}"
                        self.mail_reply = reply
                    return reply, first
                self.client = None
                if not reused:
                    self.last_result = f"MAIL {reply.code} {reply.status} (downstream closed)"
                    self.mail_reply = DOWNSTREAM_LOST
                    return DOWNSTREAM_LOST, None
                lost = reply.render()
            # it died while it waited in the pool: once more, on a new connection
            log.debug("reused downstream connection to %s lost at MAIL: %s", t, lost)
            reuse = False

    async def add_rcpt(self, sender: Address, mail_params: list[str], rcpt: Address,
                       rcpt_params: list[str]) -> Reply:
        """Forward one recipient; returns the answer for the client."""
        if self.transport.kind == "maildir":
            self.accepted.append(rcpt)
            return R.RCPT_OK
        if self.mail_reply is not None:
            return self.mail_reply
        first: Reply | None = None
        if self.client is None:
            reply, first = await self._open(sender, mail_params, rcpt, rcpt_params)
            if not reply.is_ok:
                return reply
        assert self.client is not None
        if first is not None:  # sent with MAIL
            reply = first
        else:
            try:
                reply = await self.client.rcpt(
                    rcpt.addr, rcpt_params if "DSN" in self.client.extensions else [])
            except RelayError as e:
                self.client = None
                self.last_result = f"RCPT failed: {e}"
                return _temp(e)
        if _closing(reply):
            self.client = None
            self.last_result = f"RCPT {reply.code} {reply.status} (downstream closed)"
            return DOWNSTREAM_LOST
        if reply.is_ok:
            self.accepted.append(rcpt)
        return reply

    async def deliver(self, chunks_for: Callable[[Address | None], Iterable[bytes]]) -> Reply:
        """Send the message; ``chunks_for(rcpt)`` gives the bytes (per recipient for Maildir,
        called with None for one SMTP/LMTP transaction)."""
        if self.transport.kind == "maildir":
            return await self._deliver_maildir(chunks_for)
        if self.client is None or not self.accepted:
            self.last_result = "no downstream transaction"
            return DOWNSTREAM_LOST.with_qid(self.qid)
        self.remote_name = self.client.remote_name
        try:
            replies = await self.client.data(chunks_for(None), accepted_rcpts=len(self.accepted))
        except RelayError as e:
            self.client = None
            self.last_result = f"DATA failed: {e}"
            log.warning("downstream %s during DATA: %s (qid %s)", self.transport, e, self.qid)
            return _temp(e).with_qid(self.qid)
        if any(_closing(r) for r in replies):
            self.client = None
            replies = [DOWNSTREAM_LOST if _closing(r) else r for r in replies]
        reply = self._combine(replies)
        texts = [f"{r.code} {r.status} {r.text}".strip()[:300] for r in replies]
        if len(texts) == 1:  # SMTP: one reply for every recipient (LMTP: one each)
            texts *= len(self.accepted)
        self.replies = {a.addr: t for a, t in zip(self.accepted, texts, strict=False)}
        # Like every refusal mailgate gives, a passed-back downstream refusal ends with the qid.
        return reply if reply.is_ok else reply.with_qid(self.qid)

    def _combine(self, replies: list[Reply]) -> Reply:
        self.last_result = "; ".join(f"{r.code} {r.status} {r.text}"[:200] for r in replies)
        if all(r.is_ok for r in replies):
            return Reply(250, "2.0.0", f"Ok: queued as {self.qid}")
        if len(replies) == 1 or all(r.is_perm for r in replies):
            return replies[0]
        # LMTP with mixed answers: the client can only get one reply. A 250 would lose the
        # failed copies; a 4xx makes the client retry (a duplicate for the delivered ones).
        log.warning("downstream gave mixed per-recipient replies (qid %s): %s", self.qid,
                    self.last_result)
        return Reply(451, "4.3.0", "Not delivered to every recipient, try again later")

    async def _deliver_maildir(self, chunks_for: Callable[[Address | None], Iterable[bytes]]
                               ) -> Reply:
        root = self.transport.path
        assert root is not None
        try:
            async with asyncio.timeout(self.cfg.data_timeout_s):
                for rcpt in self.accepted:
                    dest = root.expanduser()
                    path = await asyncio.to_thread(maildir.deliver, dest, chunks_for(rcpt),
                                                   self.qid)
                    log.debug("delivered %s to %s (qid %s)", rcpt.addr, path, self.qid)
        except (OSError, TimeoutError) as e:
            log.error("maildir %s: %s (qid %s)", root, e, self.qid)
            self.last_result = f"maildir failed: {e}"
            return LOCAL_WRITE_FAILED.with_qid(self.qid)
        self.last_result = f"maildir {root}: {len(self.accepted)} delivered"
        return Reply(250, "2.0.0", f"Ok: queued as {self.qid}")

    async def close(self) -> None:
        """The transaction is over: the connection goes back to the pool."""
        if self.client is not None:
            client, self.client = self.client, None
            await self.pool.release(self.transport, client)

    async def abort(self) -> None:
        """The client gave up, or the policy refused the message: end the downstream
        transaction (RSET) and give the connection back to the pool."""
        await self.close()
