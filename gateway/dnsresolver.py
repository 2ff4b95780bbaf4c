"""The gateway's DNS resolver: a ``dns.asyncresolver.Resolver`` (dnspython) configured from
``[dns]``, with one deadline per query, giving answers as values — ``ok``, ``nxdomain``,
``nodata``, ``temperror``, ``permerror`` — so that each caller (MX routing, SPF, DKIM, DMARC)
decides what each outcome means for it.

When ``dns.nameservers`` names servers, only those are asked: ``/etc/resolv.conf`` is never
read. When it is empty, the system's resolv.conf is (at the first query, not at start-up, so a
gateway that needs no DNS runs without one). There is no search list: every name is absolute.

Cache (our own, of :class:`DnsAnswer` values; dnspython's is off), keyed by (lowercased
absolute name, type), in one resolver (one per policy and process: a reload starts empty):

* ``ok`` is kept for the smallest TTL of the answer and the CNAMEs that led to it;
* ``nxdomain`` and ``nodata`` for min(SOA TTL, SOA MINIMUM) of the SOA in the authority
  section (RFC 2308 §5), or the CNAMEs' TTL if smaller; a negative answer without an SOA is
  not kept (RFC 2308 §5: SHOULD NOT be cached);
* ``temperror`` and ``permerror`` are never kept: the next query asks again.

Each TTL is clamped to ``[dns.cache_min_ttl_s, dns.cache_max_ttl_s]``; a TTL of 0 is not kept.
At most ``dns.cache_max_entries`` answers are kept, the least recently used dropped first
(0 = no cache). Expiry uses ``time.monotonic``. Identical queries in flight at the same time
(SPF, DKIM and DMARC of one message asking for the same names) share one upstream query, cache
or not; a caller cancelled while waiting does not cancel it for the others.

:meth:`DnsResolver.limited` gives a :class:`LimitedResolver` for one message: the same
``query``, but after ``dns.max_queries_per_message`` calls it answers ``temperror`` without
asking. Every call counts, cache hits included: the point is to bound the work one message
can cause, whatever is cached. A temperror, not a permerror: a lookup we chose not to make
says nothing about the sender's DNS, so it must never turn into a DKIM/DMARC failure (nor a
DMARC reject).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

# dnspython is imported where it is used, on the first query (~50 ms, once): it is ~6 MB of
# memory per process, which a gateway that asks no DNS (no DNS filters, a fixed downstream)
# need not carry. Filters that use DNS import it when the policy loads them.
if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.message
    import dns.name
    import dns.rdata

    from gateway.dnsfailfast import Health

from gateway.logs import event
from gateway.policy.schema import DnsConfig

log = logging.getLogger("mailgate.dns")

Status = Literal["ok", "nxdomain", "nodata", "temperror", "permerror"]
PER_SERVER_S = 2.0  # one server's turn before the next is asked, within the query's deadline
BACKSTOP_S = 0.5  # the hard deadline is timeout_s plus this, in case dnspython overruns
DOWN_HOLD_S = 1.0  # a server that refused is not asked for this long (gateway/dnsfailfast.py)


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    name: str
    rdtype: str
    status: Status
    records: tuple[dns.rdata.Rdata, ...] = ()
    canonical: str = ""  # the name the records belong to, after CNAMEs (``ok`` only)
    error: str = ""  # what went wrong (temperror, permerror)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Resolver(Protocol):
    """What callers need of a resolver: :class:`DnsResolver` and :class:`LimitedResolver`."""

    async def query(self, name: str, rdtype: str) -> DnsAnswer: ...


class DnsResolver:
    """Build one per policy; share it between the tasks of one event loop."""

    def __init__(self, cfg: DnsConfig, *, down_hold_s: float = DOWN_HOLD_S) -> None:
        self.cfg = cfg
        self.down_hold_s = down_hold_s
        self._health: Health | None = None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._error = ""
        # key -> (monotonic expiry, answer), least recently used first
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}
        self.cache_hits = 0  # answers given from the cache
        self.upstream_queries = 0  # queries actually sent (one per coalesced group)

    @property
    def nameservers(self) -> tuple[str, ...]:
        """Where queries go, as ``ip:port`` (reads resolv.conf if the policy names none)."""
        r = self._get()
        return () if r is None else tuple(_ns_text(ns, r.port) for ns in r.nameservers)

    @property
    def refusals(self) -> int:
        """Queries a server refused (ICMP unreachable, connection refused): gateway/dnsfailfast.py."""
        return 0 if self._health is None else self._health.refusals

    @property
    def skipped_down(self) -> int:
        """Queries not sent because their server refused less than ``down_hold_s`` ago."""
        return 0 if self._health is None else self._health.skipped

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    def cache_clear(self) -> None:
        self._cache.clear()

    def limited(self, max_queries: int | None = None) -> LimitedResolver:
        """A resolver for one message: at most ``max_queries`` (default
        ``dns.max_queries_per_message``) queries, then ``temperror`` without asking."""
        return LimitedResolver(
            self, self.cfg.max_queries_per_message if max_queries is None else max_queries)

    def _get(self) -> dns.asyncresolver.Resolver | None:
        import dns.resolver
        if self._resolver is None and not self._error:
            try:
                self._resolver = self._build()
            except dns.resolver.NoResolverConfiguration as e:
                self._error = f"no DNS servers: none in [dns] nameservers, and resolv.conf: {e}"
                log.error("%s", self._error)
        return self._resolver

    def _build(self) -> dns.asyncresolver.Resolver:
        import dns.asyncresolver
        import dns.nameserver

        from gateway.dnsfailfast import FAIL_FAST, Health, fail_fast
        if self.cfg.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)  # never reads /etc/resolv.conf
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                             for host, port in self.cfg.nameservers]
            source = "policy"
        else:
            r = dns.asyncresolver.Resolver(configure=True)
            source = "resolv.conf"
        # connected UDP sockets and a hold-down after a refusal: a dead server fails at once
        self._health = Health(self.down_hold_s)
        if FAIL_FAST:  # its dnspython self-check passed at import (gateway/patches.py)
            r.nameservers = fail_fast(list(r.nameservers), self._health, port=r.port,
                                      ports=dict(r.nameserver_ports))
        r.lifetime = self.cfg.timeout_s
        r.timeout = min(PER_SERVER_S, self.cfg.timeout_s)
        r.cache = None  # ours caches DnsAnswer values, negative ones included
        event(log, "dns_resolver", source=source, timeout_s=self.cfg.timeout_s,
              nameservers=[_ns_text(ns, r.port) for ns in r.nameservers],
              cache_max_entries=self.cfg.cache_max_entries)
        return r

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """One lookup of ``name`` (absolute; IDNA-encoded if it is not ASCII), done or given up
        within ``dns.timeout_s`` — or answered from the cache, or shared with the identical
        query already in flight."""
        import dns.exception
        import dns.name
        r = self._get()
        if r is None:
            return DnsAnswer(name, rdtype, "temperror", error=self._error)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rdtype, "permerror", error=f"bad domain name: {e}")
        key = _cache_key(qname, rdtype)
        hit = self._cached(key)
        if hit is not None:
            self.cache_hits += 1
            return _as_asked(hit, name, rdtype)
        shared = self._inflight.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._fetch(r, qname, name, rdtype, key))
            self._inflight[key] = shared
            shared.add_done_callback(lambda f: self._done(key, f))
        # shield: a caller cancelled while waiting must not cancel the query for the others
        return _as_asked(await asyncio.shield(shared), name, rdtype)

    def query_nowait(self, name: str, rdtype: str) -> DnsAnswer | None:
        """``query``'s answer when the cache has it (counted as a hit), else None: nothing
        asked, nothing counted."""
        import dns.exception
        import dns.name
        if not self._cache:
            return None
        try:
            key = _cache_key(dns.name.from_text(name), rdtype)
        except dns.exception.DNSException:
            return None  # ``query`` answers that one
        hit = self._cached(key)
        if hit is None:
            return None
        self.cache_hits += 1
        return _as_asked(hit, name, rdtype)

    def _done(self, key: tuple[str, str], fut: asyncio.Future[DnsAnswer]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]

    async def _fetch(self, r: dns.asyncresolver.Resolver, qname: dns.name.Name, name: str,
                     rdtype: str, key: tuple[str, str]) -> DnsAnswer:
        self.upstream_queries += 1
        answer, ttl = await self._resolve(r, qname, name, rdtype)
        if ttl is not None:
            self._store(key, answer, ttl)
        return answer

    def _cached(self, key: tuple[str, str]) -> DnsAnswer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry[1]

    def _store(self, key: tuple[str, str], answer: DnsAnswer, ttl: float) -> None:
        cfg = self.cfg
        if cfg.cache_max_entries <= 0:
            return
        ttl = min(max(ttl, cfg.cache_min_ttl_s), cfg.cache_max_ttl_s)
        if ttl <= 0:
            return
        self._cache[key] = (time.monotonic() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > cfg.cache_max_entries:
            self._cache.popitem(last=False)

    async def _resolve(self, r: dns.asyncresolver.Resolver, qname: dns.name.Name, name: str,
                       rdtype: str) -> tuple[DnsAnswer, float | None]:
        """The answer, and how long it may be cached (None: not at all)."""
        import dns.exception
        import dns.message
        import dns.resolver

        from gateway.dnsfailfast import unreachable
        timeout_s = self.cfg.timeout_s
        try:
            async with asyncio.timeout(timeout_s + BACKSTOP_S):
                ans = await r.resolve(qname, rdtype, search=False, lifetime=timeout_s)
        except dns.resolver.NXDOMAIN as e:
            responses = e.kwargs.get("responses") or {}
            return (DnsAnswer(name, rdtype, "nxdomain", error="no such domain (NXDOMAIN)"),
                    _negative_ttl(next(iter(responses.values()), None)))
        except dns.resolver.NoAnswer as e:
            return DnsAnswer(name, rdtype, "nodata"), _negative_ttl(e.kwargs.get("response"))
        except dns.resolver.YXDOMAIN as e:
            return DnsAnswer(name, rdtype, "permerror", error=str(e)), None
        except (dns.exception.Timeout, TimeoutError):
            return (DnsAnswer(name, rdtype, "temperror", error=f"timed out after {timeout_s:g}s"),
                    None)
        except dns.resolver.NoNameservers as e:
            errors = e.kwargs.get("errors") or []
            if errors and all(isinstance(err[3], dns.message.ChainTooLong) for err in errors):
                # a CNAME loop is the zone's fault, not a passing failure: it will not heal
                return DnsAnswer(name, rdtype, "permerror", error="CNAME chain too long (loop)"), None
            reason = unreachable(errors) or str(e) or type(e).__name__
            return DnsAnswer(name, rdtype, "temperror", error=reason), None
        except dns.exception.DNSException as e:  # SERVFAIL, REFUSED, unreachable
            return DnsAnswer(name, rdtype, "temperror", error=str(e) or type(e).__name__), None
        rrset = ans.rrset
        answer = DnsAnswer(name, rdtype, "ok", tuple(rrset) if rrset is not None else (),
                           canonical=ans.canonical_name.to_text(omit_final_dot=True))
        # the smallest TTL of the answer and of the CNAMEs followed to it
        return answer, float(ans.chaining_result.minimum_ttl)


class LimitedResolver:
    """One message's view of a :class:`DnsResolver`: every ``query`` call counts (cache hits
    too); once ``limit`` calls have been made, the next ones get ``temperror`` without asking.
    ``count`` is the calls passed on (at most ``limit``), ``refused`` those answered with the
    temperror."""

    def __init__(self, resolver: Resolver, limit: int) -> None:
        self.resolver = resolver
        self.limit = limit
        self.count = 0
        self.refused = 0

    @property
    def exhausted(self) -> bool:
        return self.count >= self.limit

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        if self.count >= self.limit:
            self.refused += 1
            return DnsAnswer(name, rdtype, "temperror",
                             error=f"per-message DNS lookup limit ({self.limit}) reached")
        self.count += 1
        return await self.resolver.query(name, rdtype)

    def query_nowait(self, name: str, rdtype: str) -> DnsAnswer | None:
        """``query``'s answer when it needs no waiting (a cached answer, or the temperror past
        the limit), counted as ``query`` counts it; else None, nothing counted."""
        if self.count >= self.limit:
            self.refused += 1
            return DnsAnswer(name, rdtype, "temperror",
                             error=f"per-message DNS lookup limit ({self.limit}) reached")
        answer = answer_now(self.resolver, name, rdtype)
        if answer is not None:
            self.count += 1
        return answer


def answer_now(resolver: Resolver, name: str, rdtype: str) -> DnsAnswer | None:
    """What ``resolver.query(name, rdtype)`` would give at once, when it can give it without
    waiting (a cached answer), counted as that query; else None and nothing counted. For the
    callers that run synchronous code between lookups (SPF's replays): a cached answer costs
    them no await and no second run. A resolver without ``query_nowait`` never answers here."""
    nowait = getattr(resolver, "query_nowait", None)
    return None if nowait is None else nowait(name, rdtype)


def per_message(view: Resolver | None, resolver: Resolver) -> Resolver:
    """The message's limited view (``FilterContext.dns``) when it wraps ``resolver`` — the
    shared one —, else ``resolver`` (a filter with its own servers keeps its own)."""
    if isinstance(view, LimitedResolver) and view.resolver is resolver:
        return view
    return resolver


def _cache_key(qname: dns.name.Name, rdtype: str) -> tuple[str, str]:
    """The cache's (and in-flight sharing's) key: the absolute name lower-cased, the type."""
    return qname.to_text().lower(), rdtype.upper()


def _as_asked(answer: DnsAnswer, name: str, rdtype: str) -> DnsAnswer:
    """A shared or cached answer, with the name and type spelled as this caller asked."""
    if answer.name == name and answer.rdtype == rdtype:
        return answer
    return dataclasses.replace(answer, name=name, rdtype=rdtype)


def _negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the authority section's SOA, and no more than
    the CNAMEs that led to the negative answer; None (not cached) without an SOA."""
    import dns.rdatatype
    if response is None:
        return None
    ttls = [min(rrset.ttl, rrset[0].minimum) for rrset in response.authority
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset)]
    if not ttls:
        return None
    return float(min([ttls[0], *(rrset.ttl for rrset in response.answer)]))


def _ns_text(ns: Any, default_port: int) -> str:
    if isinstance(ns, str):
        address, port = ns, default_port
    else:
        address, port = getattr(ns, "address", str(ns)), getattr(ns, "port", default_port)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
