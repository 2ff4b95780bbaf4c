"""Nameservers that fail fast when they are down: the ``[dns]`` servers as dnspython
``Do53Nameserver`` objects that (1) query over a *connected* UDP socket, so that the kernel's
ICMP port/host unreachable comes back at once as ``ConnectionRefusedError`` (or another
``OSError``) instead of a silent wait for the query's whole deadline, and (2) are held down for
``hold_s`` (1 s) after such a refusal: queries meanwhile are not sent at all. UDP and TCP
(dnspython's retry of a truncated answer) are held down apart (``SERVER/tcp``): a server whose
TCP port is closed still answers everything that fits in UDP.

dnspython's asyncio backend sends UDP from an unconnected socket (it connects only where the
platform requires it, ``Backend.datagram_connection_required``), and the kernel does not report
ICMP errors on an unconnected socket: a refusing server cost every lookup ``dns.timeout_s``.
Here the backend says a connection is required (public ``dns.asyncbackend.Backend`` API; the
path dnspython takes on Windows), and every other call goes to the loop's own backend.

dnspython takes a server that raised an ``OSError`` out of that query's list and asks the next
one at once; when none is left it raises ``NoNameservers``, which the resolver answers as
``temperror``. So: one server refusing, the next is asked at once; all refusing, a temperror at
once. A server that is held down raises :class:`ServerDown` (a ``ConnectionRefusedError``)
without sending: a dead resolver under a flood of lookups gets one query per ``hold_s``, not one
per lookup (nor does the kernel's ICMP rate limit get a chance to turn refusals back into
timeouts). A timeout is not a refusal: a server that drops queries is not held down.

:class:`Health` keeps the hold-down times and counts ``refusals`` (queries a server refused)
and ``skipped`` (queries not sent because their server was held down). It logs one
``dns_server_down`` line when a server starts refusing and one ``dns_server_up`` when it
answers again, not one per query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import dns.asyncbackend
import dns.message
import dns.nameserver

from gateway import patches
from gateway.logs import event

log = logging.getLogger("mailgate.dns")

HOLD_S = 1.0  # a server that refused is not asked again for this long


class ServerDown(ConnectionRefusedError):
    """Not sent: the server refused a query less than ``hold_s`` ago."""


class Health:
    """Which servers refused lately (hold-down until a monotonic time), with counters."""

    def __init__(self, hold_s: float = HOLD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self._down_until: dict[str, float] = {}
        self._reported: set[str] = set()  # servers logged down and not yet logged up
        self.refusals = 0  # queries a server refused (ICMP unreachable, TCP reset, ...)
        self.skipped = 0  # queries not sent: their server was held down

    def check(self, server: str) -> None:
        """Raise :class:`ServerDown` (counted) while ``server`` is held down."""
        until = self._down_until.get(server)
        if until is None:
            return
        if self.clock() < until:
            self.skipped += 1
            raise ServerDown(f"{server} refused a query less than {self.hold_s:g}s ago: "
                             "held down, not asked")
        del self._down_until[server]  # the hold is over: the next query probes it

    def refused(self, server: str, error: OSError) -> None:
        self.refusals += 1
        if self.hold_s > 0:
            self._down_until[server] = self.clock() + self.hold_s
        if server not in self._reported:
            self._reported.add(server)
            event(log, "dns_server_down", logging.WARNING, server=server,
                  error=error.strerror or str(error) or type(error).__name__,
                  hold_s=self.hold_s)

    def answered(self, server: str) -> None:
        if server in self._reported:
            self._reported.discard(server)
            event(log, "dns_server_up", server=server)


class FailFastNameserver(dns.nameserver.Do53Nameserver):
    """A ``Do53Nameserver`` asked over a connected UDP socket, held down after a refusal."""

    def __init__(self, address: str, port: int, health: Health) -> None:
        super().__init__(address, port)
        self.health = health
        self.label = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

    def __str__(self) -> str:  # how dnspython names the server in its errors
        return self.label

    async def async_query(self, request: dns.message.QueryMessage,  # dnspython's signature
                          timeout: float,  # noqa: ASYNC109
                          source: str | None, source_port: int, max_size: bool,
                          backend: dns.asyncbackend.Backend, one_rr_per_rrset: bool = False,
                          ignore_trailing: bool = False) -> dns.message.Message:
        # max_size: dnspython's "over TCP" (after a truncated UDP answer). UDP and TCP are
        # held down apart: a server whose TCP port is closed (firewalled) still answers UDP
        where = f"{self.label}/tcp" if max_size else self.label
        self.health.check(where)
        try:
            response = await super().async_query(
                request, timeout, source, source_port, max_size, ConnectedUdp(backend),
                one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing)
        except TimeoutError:
            raise  # silence is not a refusal
        except OSError as e:
            self.health.refused(where, e)
            raise
        self.health.answered(where)
        return response


class ConnectedUdp(dns.asyncbackend.Backend):
    """The event loop's dnspython backend, but its UDP sockets are connected to the server."""

    def __init__(self, inner: dns.asyncbackend.Backend) -> None:
        self.inner = inner

    def name(self) -> str:
        return self.inner.name()

    def datagram_connection_required(self) -> bool:
        return True

    async def make_socket(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.make_socket(*args, **kwargs)

    async def sleep(self, interval: float) -> None:
        await self.inner.sleep(interval)

    def get_transport_class(self) -> Any:
        return self.inner.get_transport_class()

    async def wait_for(self, awaitable: Any, timeout: float) -> Any:  # noqa: ASYNC109
        return await self.inner.wait_for(awaitable, timeout)


def fail_fast(servers: list[Any], health: Health, *, port: int = 53,
              ports: dict[str, int] | None = None) -> list[Any]:
    """``servers`` (a dnspython resolver's ``nameservers``) with every plain Do53 server
    replaced by a :class:`FailFastNameserver` sharing ``health``; others (DoH, DoT) kept.
    Read from resolv.conf, dnspython keeps them as address strings, asked on ``ports[address]``
    or else ``port`` (the resolver's ``nameserver_ports`` and ``port``): those too."""
    import dns.inet
    out: list[Any] = []
    for ns in servers:
        if type(ns) is dns.nameserver.Do53Nameserver:
            ns = FailFastNameserver(ns.address, ns.port, health)
        elif isinstance(ns, str) and dns.inet.is_address(ns):
            ns = FailFastNameserver(ns, (ports or {}).get(ns, port), health)
        out.append(ns)
    return out


def unreachable(errors: list[Any]) -> str | None:
    """A short reason when every server failed with an ``OSError`` (refused, unreachable,
    held down) — dnspython's ``NoNameservers`` errors, (server, tcp, port, exception,
    response) each —, else None."""
    if not errors or not all(isinstance(err[3], OSError) for err in errors):
        return None
    seen: dict[str, str] = {}
    for server, _tcp, _port, exc, _resp in errors:
        why = ("held down after a refusal" if isinstance(exc, ServerDown)
               else (exc.strerror or str(exc) or type(exc).__name__).lower())
        seen.setdefault(str(server), why)
    return "no nameserver reachable: " + "; ".join(f"{w} {why}" for w, why in seen.items())


def check_connected_udp() -> str | None:
    """The dnspython behaviour this module relies on, looked up once at import (patches.py):
    ``Do53Nameserver.async_query`` takes the arguments passed on, and the backend is asked
    ``datagram_connection_required``. None when all hold, else the reason."""
    import inspect

    import dns.asyncquery
    params = inspect.signature(dns.nameserver.Do53Nameserver.async_query).parameters
    wanted = ("request", "timeout", "source", "source_port", "max_size", "backend",
              "one_rr_per_rrset", "ignore_trailing")
    missing = [p for p in wanted if p not in params]
    if missing:
        return "Do53Nameserver.async_query lacks " + ", ".join(missing)
    if not hasattr(dns.asyncbackend.Backend, "datagram_connection_required"):
        return "dns.asyncbackend.Backend has no datagram_connection_required"
    if not patches.calls(dns.asyncquery.udp, "datagram_connection_required"):
        return "dns.asyncquery.udp no longer asks datagram_connection_required"
    return None


# when the check fails, dnsresolver.py keeps dnspython's own nameservers (slow but correct)
FAIL_FAST = patches.install("dnspython.connected-udp", check_connected_udp)
