"""Downstream connections for the queue manager: at most ``max_per_destination`` at once per
transport, and connections reused between messages (RSET, then the next MAIL) for a short idle
time instead of a new TCP + greeting + EHLO for every message."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.dnsresolver import DnsResolver
from gateway.errors import RelayError
from gateway.policy.schema import RelayConfig
from gateway.relay.client import DownstreamClient
from gateway.relay.connect import connect_transport
from gateway.relay.transport import Transport

PROBE_AFTER_S = 1.0  # an idle connection older than this is checked with RSET before reuse


@dataclass
class _Idle:
    client: DownstreamClient
    since: float = field(default_factory=time.monotonic)


class DownstreamPool:
    def __init__(self, relay: RelayConfig, helo_name: str, *, max_per_destination: int,
                 idle_s: float, resolver: DnsResolver | None = None) -> None:
        self.relay = relay
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

    @contextlib.asynccontextmanager
    async def session(self, t: Transport) -> AsyncIterator[DownstreamClient]:
        """A connected client for one transaction; give it back by leaving the block normally
        (kept for reuse, after an RSET if a transaction is still open) — an exception closes
        it."""
        await self._reap()
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
                await self._release(t, client)
        finally:
            self._users[t] -= 1
            if not self._users[t]:  # nobody holds or waits: forget it (one per MX domain)
                del self._users[t], self._sems[t]

    async def _reap(self) -> None:
        """Close idle connections past ``idle_s`` for every destination, not only the one in
        use, so that none lingers half-closed. The expired ones leave the idle lists *before*
        any await (lists changed in place): a connection being closed here can never be
        handed to another delivery meanwhile, and what others park during the awaits stays."""
        now = time.monotonic()
        expired: list[_Idle] = []
        for t, items in list(self._idle.items()):
            keep = [i for i in items if now - i.since <= self.idle_s and not i.client.closed]
            expired += [i for i in items if not any(i is k for k in keep)]
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

    async def _release(self, t: Transport, client: DownstreamClient) -> None:
        if client.closed or self.idle_s <= 0 or self.closed:
            await client.quit()
            return
        if not client.in_transaction:  # ended by its data: ready for the next MAIL as is
            self._idle.setdefault(t, []).append(_Idle(client))
            return
        try:
            reply = await client.rset()
        except RelayError:
            return
        if not reply.is_ok:
            await client.quit()
            return
        self._idle.setdefault(t, []).append(_Idle(client))

    async def _connect(self, t: Transport) -> DownstreamClient:
        self.opened += 1
        return await connect_transport(t, self.relay, self.helo_name, self.resolver)

    async def close(self) -> None:
        self.closed = True
        items = [i for lst in self._idle.values() for i in lst]
        for lst in self._idle.values():
            lst.clear()  # nobody can take one while we close them
        self._idle.clear()
        for item in items:
            await item.client.quit()
