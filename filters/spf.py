"""The ``spf`` filter: RFC 7208 SPF on the MAIL FROM identity (the HELO identity for the null
sender), evaluated by pyspf with every DNS lookup answered by the gateway's own resolver.

Symbols (exactly one per message): SPF_PASS, SPF_FAIL, SPF_SOFTFAIL, SPF_NEUTRAL, SPF_NONE,
SPF_TEMPERROR, SPF_PERMERROR. Options: the matching mechanism (or the error text) and, for a
fail, the explanation. ``data``: ``result`` (the RFC 7208 result name), ``domain`` (the
domain checked), ``identity`` (``mailfrom`` or ``helo``), ``mechanism``, ``explanation`` — for
dependents such as DMARC. The RFC 7208 §4.6.4 limits (10 DNS-querying terms, 2 void lookups, 10
MX/PTR names) are pyspf's.

DNS: pyspf is blocking and does every lookup through its module-level ``spf.DNSLookup(name,
qtype, strict, timeout)``; this module replaces that function once with a dispatcher that hands
each lookup to the answerer bound to the current thread, so the one async resolver (servers,
deadlines, cache, per-message limits) serves SPF too, and a lookup outside a bound check is a
TempError: pyspf never reaches the host resolver. A check runs in two ways:

* replayed on the event loop (the usual case): pyspf runs inline with a :class:`_Replay`
  answerer that answers from the lookups made so far and stops the run at the first one not
  made yet (:class:`_NeedDns`); the check awaits that lookup and runs pyspf again from the
  start. Evaluation is a pure function of the answers, so the last run — the first with no
  missing lookup — is the check. A record needing N lookups costs N+1 short runs and no thread:
  a thread trip per check (wake-ups, GIL hand-offs, a cross-thread call per lookup) cost more
  than the runs under load.
* in a worker thread (``asyncio.to_thread``) after ``INLINE_ROUNDS`` runs: a record with many
  lookups goes on there with a :class:`_Bridge`, which runs each remaining lookup on the event
  loop (``asyncio.run_coroutine_threadsafe``) and waits for it, so the loop never replays one
  check more than that many times.

Either way every lookup waits at most what is left of the check's time budget; one it does not
get in time is a TempError for pyspf (SPF_TEMPERROR).

The dispatcher is installed only once pyspf is seen to still look up through ``DNSLookup`` and a
known record evaluated through it gives the known results (patch ``pyspf.dns-lookup``,
gateway/patches.py). Otherwise pyspf runs in a worker thread with its own DNS (the host's
resolver, not the policy's; the check's budget still bounds it), with one warning line.

Settings: ``check_timeout_s`` (the whole check's budget, default 10; keep it below the
filter's pipeline ``timeout_s`` — that key belongs to the loader — so that a slow DNS gives
SPF_TEMPERROR rather than the filter's ``on_error``), ``dns_nameservers`` (list of
``IP``/``IP:PORT``/``[IPv6]:PORT``; empty = the system's resolv.conf), ``dns_timeout_s`` (one
query's deadline, default 5), ``received_spf`` (bool, default false: add an RFC 7208 §9.1
``Received-SPF:`` header, pyspf's wording, for the checked identity). Without either ``dns_`` setting the filter uses the shared
resolver of :class:`~gateway.services.Services` (the policy's ``[dns]``) when it carries one;
with them, or without a shared resolver, it builds its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Mapping
from typing import Any

import dns.name
import dns.rdata
import spf

from gateway import patches
from gateway.dnsresolver import DnsAnswer, DnsResolver, Resolver, answer_now, per_message
from gateway.filterapi import AddHeader, ConfigError, Filter, FilterContext, Result, Symbol
from gateway.policy.loader import parse_nameserver
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from gateway.settings import boolean, check_keys, positive, str_list

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
SYMBOLS = {r: f"SPF_{r.upper()}" for r in RESULTS}
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_DNS_TIMEOUT_S = 5.0

INLINE_ROUNDS = 8  # pyspf runs on the event loop per check, at most; then a worker thread
_OUT_OF_TIME = "no answer within the SPF time budget"

_bound = threading.local()  # .bridge: the answerer of the check running in this thread
Answers = dict[tuple[str, str], DnsAnswer]


class _NeedDns(BaseException):
    """Ends a replayed run at a lookup not made yet. A BaseException: pyspf has a bare
    ``except: pass`` (around the exp= lookup) and must not turn it into a result — and if it
    swallows one anyway, :attr:`_Replay.missed` still shows the run was incomplete."""


class _Replay:
    """Answers pyspf's lookups for one run on the event loop from the lookups made so far."""

    def __init__(self, answers: Answers, resolver: Resolver | None = None,
                 deadline: float = 0.0) -> None:
        self.answers = answers
        self.missed: list[tuple[str, str]] = []
        self.resolver = resolver  # for answers it has without waiting (cached), in time
        self.deadline = deadline  # time.monotonic() value

    def lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        answer = self.answers.get((name, qtype))
        if answer is None and self.resolver is not None and time.monotonic() < self.deadline:
            answer = answer_now(self.resolver, name, qtype)
            if answer is not None:
                self.answers[(name, qtype)] = answer
        if answer is None:
            self.missed.append((name, qtype))
            raise _NeedDns
        return _to_pyspf(answer, name, qtype)


class _Bridge:
    """Answers pyspf's lookups for one check, from its worker thread, via the event loop
    (the lookups the replays made first)."""

    def __init__(self, resolver: Resolver, loop: asyncio.AbstractEventLoop,
                 deadline: float, answers: Answers | None = None) -> None:
        self.resolver = resolver
        self.loop = loop
        self.deadline = deadline  # time.monotonic() value
        self.answers = dict(answers or {})
        self.aborted = threading.Event()
        self.lookups = 0
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[DnsAnswer] | None = None

    def abort(self) -> None:
        """Called on the loop when the check is cancelled: the thread stops at its next step."""
        with self._lock:
            self.aborted.set()
            if self._pending is not None:
                self._pending.cancel()

    def lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        known = self.answers.get((name, qtype))
        if known is not None:
            return _to_pyspf(known, name, qtype)
        remaining = self.deadline - time.monotonic()
        with self._lock:  # no gap between the abort check and publishing the pending lookup
            if self.aborted.is_set() or remaining <= 0:
                raise spf.TempError("DNS: SPF check cancelled or out of its time budget")
            self.lookups += 1
            fut = asyncio.run_coroutine_threadsafe(self.resolver.query(name, qtype), self.loop)
            self._pending = fut
        try:
            answer = fut.result(timeout=remaining)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            fut.cancel()
            raise spf.TempError(f"DNS: {name}/{qtype}: {_OUT_OF_TIME}") from None
        finally:
            with self._lock:
                self._pending = None
        return _to_pyspf(answer, name, qtype)


def _to_pyspf(answer: DnsAnswer, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
    """A DnsAnswer in pyspf's DNSLookup shape: ``[((name, qtype), value), ...]``."""
    if answer.status == "temperror":
        raise spf.TempError(f"DNS {name}/{qtype}: {answer.error}")
    if answer.status != "ok":  # nxdomain, nodata; permerror = a name DNS cannot carry
        return []
    out: list[tuple[tuple[str, str], Any]] = []
    for rd in answer.records:
        value: Any
        if qtype in ("A", "AAAA"):
            value = rd.address  # type: ignore[attr-defined]
        elif qtype == "MX":
            exchange: dns.name.Name = rd.exchange  # type: ignore[attr-defined]
            value = (rd.preference,  # type: ignore[attr-defined]
                     "" if exchange == dns.name.root else exchange.to_text(True))
        elif qtype == "PTR":
            value = rd.target.to_text(True)  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            value = list(rd.strings)  # type: ignore[attr-defined]
        else:
            continue
        out.append(((name, qtype), value))
    return out


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None
              ) -> list[tuple[tuple[str, str], Any]]:
    """Installed as ``spf.DNSLookup``: the lookup goes to this thread's bridge, or nowhere."""
    bridge: _Bridge | None = getattr(_bound, "bridge", None)
    if bridge is None:
        raise spf.TempError("DNS: no gateway resolver bound to this SPF check")
    return bridge.lookup(name, qtype)


_PYSPF_LOOKUP = getattr(spf, "DNSLookup", None)  # pyspf's own


def check_dns_bridge() -> str | None:
    """None when pyspf's ``query.dns`` still calls ``DNSLookup`` and a known record, answered
    through :func:`_dispatch`, gives pass and fail for known addresses; else why not."""
    if not patches.calls(getattr(getattr(spf, "query", None), "dns", None), "DNSLookup"):
        return "pyspf's query.dns no longer calls DNSLookup"
    record = dns.rdata.from_text("IN", "TXT", '"v=spf1 ip4:192.0.2.0/25 -all"')
    answers: Answers = {("selftest.invalid", "TXT"): DnsAnswer(
        "selftest.invalid", "TXT", "ok", (record,), "selftest.invalid")}
    saved = spf.DNSLookup
    spf.DNSLookup = _dispatch
    try:
        for ip, want in (("192.0.2.7", "pass"), ("192.0.2.200", "fail")):
            _bound.bridge = _Replay(answers)
            try:
                got = spf.query(i=ip, s="check@selftest.invalid", h="selftest.invalid").check()
            finally:
                _bound.bridge = None
            if str(got[0]).lower() != want:
                return f"a known record gave {got[0]!r} for {ip}, not {want}"
    finally:
        spf.DNSLookup = saved
    return None


def _apply_dns_bridge() -> None:
    spf.DNSLookup = _dispatch


DNS_BRIDGE = patches.install("pyspf.dns-lookup", check_dns_bridge, _apply_dns_bridge)


class SpfFilter(Filter):
    name = "spf"
    background = True  # runs while RCPT and DATA stream in, unless an early rule needs it

    def __init__(self, resolver: DnsResolver, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 receiver: str = "mailgate.localdomain", received_spf: bool = False) -> None:
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.receiver = receiver  # %{r} in explanations
        self.received_spf = received_spf

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> SpfFilter:
        check_keys(cfg, {"check_timeout_s", "dns_nameservers", "dns_timeout_s", "received_spf"})
        timeout_s = positive(cfg, "check_timeout_s", DEFAULT_TIMEOUT_S)
        dns_timeout_s = positive(cfg, "dns_timeout_s", DEFAULT_DNS_TIMEOUT_S)
        servers = []
        for text in str_list(cfg, "dns_nameservers"):
            try:
                servers.append(parse_nameserver(text))
            except ValueError as e:
                raise ConfigError("dns_nameservers", str(e)) from None
        shared: DnsResolver | None = getattr(services, "resolver", None)
        if shared is None or "dns_nameservers" in cfg or "dns_timeout_s" in cfg:
            resolver = DnsResolver(DnsConfig(nameservers=tuple(servers),
                                             timeout_s=dns_timeout_s))
        else:
            resolver = shared
        return cls(resolver, timeout_s=timeout_s, receiver=services.hostname,
                   received_spf=boolean(cfg, "received_spf", False))

    async def on_mail(self, ctx: FilterContext) -> Result:
        sender = ctx.sender
        helo = (ctx.client.helo or "").strip().rstrip(".")
        if sender is not None and not sender.is_null:
            if sender.literal:
                return _none("mailfrom", "", "address literal domain")
            identity, domain = "mailfrom", sender.domain_key
            mailfrom = f"{sender.local}@{domain}"
        else:
            if not helo or helo.startswith("["):
                return _none("helo", helo, "null sender and no HELO domain")
            identity, domain, mailfrom = "helo", helo.lower(), ""
        return await self.check(ctx.client.ip, mailfrom, helo, identity, domain,
                                per_message(ctx.dns, self.resolver))

    async def check(self, ip: str, mailfrom: str, helo: str, identity: str,
                    domain: str, resolver: Resolver | None = None) -> Result:
        resolver = resolver or self.resolver
        if not DNS_BRIDGE:
            return await self._check_own_dns(ip, mailfrom, helo, identity, domain)
        deadline = time.monotonic() + self.timeout_s
        answers: Answers = {}
        for _ in range(INLINE_ROUNDS):
            replay = _Replay(answers, resolver, deadline)
            try:
                out = self._run(replay, ip, mailfrom, helo)
            except _NeedDns:
                pass
            if not replay.missed:
                break
            for name, qtype in replay.missed:
                answers[(name, qtype)] = await _lookup(resolver, name, qtype, deadline)
        else:
            bridge = _Bridge(resolver, asyncio.get_running_loop(), deadline, answers)
            try:
                out = await asyncio.to_thread(self._run, bridge, ip, mailfrom, helo)
            except asyncio.CancelledError:
                bridge.abort()
                raise
        return self._result(out, identity, domain)

    async def _check_own_dns(self, ip: str, mailfrom: str, helo: str, identity: str,
                             domain: str) -> Result:
        """pyspf with its own DNS, in a worker thread, within the check's budget; asking the
        configured nameservers when there are (:func:`_own_dns_asks`)."""
        _own_dns_asks(getattr(getattr(self.resolver, "cfg", None), "nameservers", ()))
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await asyncio.to_thread(self._run, None, ip, mailfrom, helo)
        except TimeoutError:
            out = ("temperror", f"DNS: {_OUT_OF_TIME}", "", "")
        return self._result(out, identity, domain)

    def _result(self, out: tuple[str, str, str, str], identity: str, domain: str) -> Result:
        result, mechanism, explanation, header = out
        options = tuple(o for o in (mechanism, explanation) if o)
        edits = (AddHeader("Received-SPF", header),) if self.received_spf and header else ()
        return Result(symbols=(Symbol(SYMBOLS[result], options),), edits=edits,
                      data={"result": result, "domain": domain, "identity": identity,
                            "mechanism": mechanism, "explanation": explanation})

    def _run(self, bridge: _Replay | _Bridge | None, ip: str, mailfrom: str, helo: str
             ) -> tuple[str, str, str, str]:
        """One pyspf check, on the loop (replayed) or in a worker thread (bridged): (result,
        mechanism or error, explanation, Received-SPF value)."""
        _bound.bridge = bridge
        try:
            q = spf.query(i=ip, s=mailfrom, h=helo, receiver=self.receiver)
            result, _code, text = q.check()
        finally:
            _bound.bridge = None
        result = str(result).lower()
        if result not in SYMBOLS:  # 'ambiguous' exists only in pyspf's harsh mode
            result = "permerror"
        header = ""
        if self.received_spf:
            try:  # RFC 7208 §9.1: "Pass (receiver: comment) client-ip=...; ...; identity=..."
                header = str(q.get_header(result, receiver=self.receiver))
            except Exception:  # pyspf cannot describe this one: no header rather than no check
                header = ""
        if result in ("temperror", "permerror"):
            # text is "SPF Permanent Error: <reason>: <mechanism>"; keep what follows the prefix
            return result, str(text).partition("Error: ")[2] or str(text), "", header
        mechanism = str(q.mechanism or "")
        return result, mechanism, str(text) if result == "fail" else "", header


_own_dns: tuple[tuple[tuple[str, int], ...], object] | None = None  # (servers, the resolver)


def _own_dns_asks(servers: tuple[tuple[str, int], ...]) -> None:
    """Point pyspf's own DNS (the fallback: it asks dnspython's default resolver, which reads
    /etc/resolv.conf) at ``servers``, the nameservers the policy names for SPF, so that
    ``[dns] nameservers`` still holds ("only those are asked"); without any, the default
    resolver (resolv.conf) is what the policy asks for as well."""
    global _own_dns
    import dns.nameserver
    import dns.resolver
    if not servers or (_own_dns is not None and _own_dns[0] == servers
                       and dns.resolver.default_resolver is _own_dns[1]):
        return
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    dns.resolver.default_resolver = r
    _own_dns = (servers, r)


async def _lookup(resolver: Resolver, name: str, qtype: str, deadline: float) -> DnsAnswer:
    """One lookup for a replayed check, within what is left of its budget (past it: a
    temperror answer, which pyspf gets as a TempError)."""
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            return await resolver.query(name, qtype)
    except TimeoutError:
        return DnsAnswer(name, qtype, "temperror", error=_OUT_OF_TIME)


def _none(identity: str, domain: str, why: str) -> Result:
    return Result(symbols=(Symbol(SYMBOLS["none"], (why,)),),
                  data={"result": "none", "domain": domain, "identity": identity,
                        "mechanism": "", "explanation": ""})
