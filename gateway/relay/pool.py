"""Downstream connections reused between messages (the next MAIL follows the end of data; RSET
first after a transaction left open) for a short idle time, instead of a new TCP + greeting +
EHLO (+ STARTTLS) and QUIT for every message. The queue manager takes them with ``session``, at
most ``max_per_destination`` at once per transport; proxy mode with ``acquire``/``release``,
one per client transaction (the client sessions are its limit). An idle connection is closed
once it has waited ``idle_s``, by a timer armed while any wait; the reaping it starts is
supervised (``gateway/supervise.py``: logged, counted as ``<name>-reaper``, run again)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway import supervise
from gateway.dnsresolver import DnsResolver
from gateway.errors import RelayError
from gateway.policy.schema import RelayConfig
from gateway.relay.client import DownstreamClient
from gateway.relay.connect import connect_transport
from gateway.relay.transport import Transport

PROBE_AFTER_S = 1.0  # an idle connection older than this is checked with RSET before reuse
REAP_SLACK_S = 0.05  # the idle timer fires this much after the oldest connection is due


@dataclass
class _Idle:
    client: DownstreamClient
    since: float = field(default_factory=time.monotonic)


class DownstreamPool:
    def __init__(self, relay: RelayConfig, helo_name: str, *, max_per_destination: int,
                 idle_s: float, resolver: DnsResolver | None = None,
                 name: str = "pool") -> None:
        self.relay = relay
        self.name = name  # in logs and supervise.FAILURES ("proxy-pool", "queue-pool")
        self.resolver = resolver  # for mx transports (one per recipient domain)
        self.helo_name = helo_name
        self.max_per_destination = max_per_destination
        self.idle_s = idle_s
        self._sems: dict[Transport, asyncio.Semaphore] = {}
        self._users: dict[Transport, int] = {}  # sessions holding or waiting for a semaphore
        self._idle: dict[Transport, list[_Idle]] = {}
        self.closed = False  # after a reload: connections are closed, not parked
        self.opened = 0  # connections made (for logs and tests)
        self.reused = 0
        self._reaper: asyncio.TimerHandle | None = None  # armed while connections are idle
        self._reaping: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def session(self, t: Transport) -> AsyncIterator[DownstreamClient]:
        """A connected client for one transaction; give it back by leaving the block normally
        (kept for reuse, after an RSET if a transaction is still open) — an exception closes
        it."""
        await self._reap_unless_timed()
        sem = self._sems.setdefault(t, asyncio.Semaphore(self.max_per_destination))
        self._users[t] = self._users.get(t, 0) + 1
        try:
            async with sem:
                client = await self._reuse(t) or await self._connect(t)
                try:
                    yield client
                except BaseException:
                    client.close()
                    raise
                await self.release(t, client)
        finally:
            self._users[t] -= 1
            if not self._users[t]:  # nobody holds or waits: forget it (one per MX domain)
                del self._users[t], self._sems[t]

    async def acquire(self, t: Transport, *, reuse: bool = True
                      ) -> tuple[DownstreamClient, bool]:
        """A connected client for ``t``, without the per-destination limit: an idle one
        (``True``: reused, so it may turn out stale at the next command) or, without one or
        ``reuse``, a new one. Give it back with ``release``; after an error it is closed
        already (``DownstreamClient``)."""
        await self._reap_unless_timed()
        client = await self._reuse(t) if reuse else None
        if client is not None:
            return client, True
        return await self._connect(t), False

    async def _reap_unless_timed(self) -> None:
        """``_reap`` before taking a connection, unless the reaper's timer is set to do it
        (it is whenever connections are idle): a scan of every idle connection for each
        message cost more than the reaping, at a few hundred of them."""
        if self._reaper is None:
            await self._reap()

    async def _reap(self) -> None:
        """Close idle connections past ``idle_s`` for every destination, not only the one in
        use, so that none lingers half-closed. The expired ones leave the idle lists *before*
        any await (lists changed in place): a connection being closed here can never be
        handed to another delivery meanwhile, and what others park during the awaits stays."""
        now = time.monotonic()
        expired: list[_Idle] = []
        for t, items in list(self._idle.items()):
            keep: list[_Idle] = []
            for i in items:
                (keep if now - i.since <= self.idle_s and not i.client.closed
                 else expired).append(i)
            items[:] = keep
            if not items:
                del self._idle[t]
        try:
            for item in expired:
                await item.client.quit()
        finally:  # cancelled half-way: the rest is closed, not leaked
            for item in expired:
                if not item.client.closed:
                    item.client.close()

    async def _reuse(self, t: Transport) -> DownstreamClient | None:
        idle = self._idle.get(t, [])
        while idle:
            item = idle.pop()
            if not idle and self._idle.get(t) is idle:  # no empty lists in the map
                del self._idle[t]
            age = time.monotonic() - item.since
            if item.client.closed or age > self.idle_s:
                await item.client.quit()
                continue
            if item.client.peer_closed:  # it hung up while idle (e.g. restarted): no probe needed
                item.client.close()
                continue
            if age > PROBE_AFTER_S:  # the peer may have dropped it meanwhile: ask first
                try:
                    if not (await item.client.rset()).is_ok:
                        raise RelayError("RSET refused")
                except RelayError:
                    item.client.close()
                    continue
            self.reused += 1
            return item.client
        return None

    async def release(self, t: Transport, client: DownstreamClient) -> None:
        """Park ``client`` for reuse (after an RSET if a transaction is open), or QUIT it when
        reuse is off, the pool closed or the RSET refused."""
        if client.closed or self.idle_s <= 0 or self.closed:
            await client.quit()
            return
        if client.in_transaction:  # else ended by its data: ready for the next MAIL as is
            try:
                reply = await client.rset()
            except RelayError:
                return
            if not reply.is_ok or self.closed:  # refused, or the pool closed meanwhile
                await client.quit()
                return
        self._idle.setdefault(t, []).append(_Idle(client))
        self._arm_reaper()

    def _arm_reaper(self) -> None:
        """Close idle connections when the oldest has waited ``idle_s``: without this they
        would linger (half-closed once the peer times out) until the next message."""
        if self._reaper is not None or self.closed or self._reaping_elsewhere():
            return
        # (an empty list is never kept, but that is not worth a crash of the reaper)
        oldest = min((i.since for items in self._idle.values() for i in items), default=None)
        if oldest is None:
            return
        delay = max(0.0, oldest + self.idle_s - time.monotonic()) + REAP_SLACK_S
        self._reaper = asyncio.get_running_loop().call_later(delay, self._reap_idle)

    def _reaping_elsewhere(self) -> bool:
        """A reaping task other than the current one is at work, or waiting to retry after a
        failure: it re-arms the timer itself when it is done."""
        me = asyncio.current_task()
        return any(t is not me and not t.done() for t in self._reaping)

    def _reap_idle(self) -> None:
        self._reaper = None
        task = supervise.start(f"{self.name}-reaper", self._reap_then_rearm)
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _reap_then_rearm(self) -> None:
        """The reaper task's body. No re-arming after a failure: supervise runs this again
        after its backoff (re-arming there too started a new task, failing like this one,
        every REAP_SLACK_S while the old ones kept retrying: tasks and log lines grew
        without bound)."""
        await self._reap()
        self._arm_reaper()

    async def _connect(self, t: Transport) -> DownstreamClient:
        self.opened += 1
        return await connect_transport(t, self.relay, self.helo_name, self.resolver)

    async def close(self) -> None:
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        items = [i for lst in self._idle.values() for i in lst]
        for lst in self._idle.values():
            lst.clear()  # nobody can take one while we close them
        self._idle.clear()
        for item in items:
            await item.client.quit()
