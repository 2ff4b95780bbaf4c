"""The ``dnsbl`` filter: the connecting client's IP address looked up in DNS blocklists
(RFC 5782), at the connect stage, so that a ``stage = "connect"`` rule can refuse in place of
the greeting. Also the zone settings and answer reading shared with ``uribl``.

Each zone is asked for the reversed address: IPv4 octets reversed (``2.0.0.127.zone``), IPv6
as 32 reversed nibbles (RFC 5782 §2.4); an IPv4-mapped IPv6 address counts as IPv4. Every
configured zone is asked at once, through the shared ``[dns]`` resolver, under one deadline
(``dns_timeout_s``); a zone not answered by then is a temperror.

Reading an answer (A records): NXDOMAIN or no A record = not listed. A record in
127.0.0.0/8 = listed: a code named in the zone's ``codes`` gives ``<SYMBOL>_<NAME>``; in a
``bits`` zone (SURBL style) each configured bit set in the last octet gives
``<SYMBOL>_<NAME>``; anything else in 127.0.0.0/8 gives the generic ``<SYMBOL>`` (option: the
code). An answer that holds an *error code* — an address outside 127.0.0.0/8, ``127.0.0.1``
(RFC 5782 §5: never a listing; URIBL/SURBL's "query refused") or one in 127.255.255.0/24
(Spamhaus: "public resolver"/"excessive queries"/typo) — does not count as listed at all:
``<SYMBOL>_BLOCKED`` (option: the code) and a warning in the log. A failed lookup (timeout,
SERVFAIL, the per-message DNS cap) gives ``<SYMBOL>_TEMPERROR`` (option: why): no finding,
scored 0 unless the policy says otherwise; a permerror (a broken answer) is logged only.

Skipped (no lookups, ``data["skipped"]`` says why): trusted clients (``trusted_networks``),
and with ``skip_private = true`` (the default) addresses that are not globally routable
(private, loopback, link-local, reserved — a blocklist knows nothing of them).

Settings: ``zones`` (required, a list of tables: ``zone``, ``symbol``, optionally ``codes``
``{"127.0.0.2" = "SBL"}`` or ``bits`` ``{"4" = "XBL"}`` (not both), ``ipv4`` (true), ``ipv6``
(false)), ``dns_timeout_s`` (5; keep it below the filter's ``timeout_s``), ``max_lookups``
(20: the queries one connection may cause), ``skip_private`` (true).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.dnsresolver import DnsAnswer, DnsResolver, Resolver, per_message
from gateway.filterapi import ConfigError, Filter, FilterContext, Result, Symbol
from gateway.logs import event
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from gateway.settings import boolean, check_keys, integer, positive

log = logging.getLogger("mailgate.dnsbl")

SYMBOL_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
SUFFIX_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")
LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
NOT_LISTED = ipaddress.IPv4Address("127.0.0.1")  # RFC 5782 §5; "refused" at URIBL/SURBL
MAX_OPTIONS = 5  # items named in one symbol's options


@dataclass(frozen=True, slots=True)
class Zone:
    zone: str
    symbol: str
    codes: Mapping[str, str] = field(default_factory=dict)  # "127.0.0.2" -> "SBL"
    bits: tuple[tuple[int, str], ...] = ()  # (mask, "PH")
    flags: Mapping[str, bool] = field(default_factory=dict)  # ipv4/ipv6, ips/full_host

    def flag(self, name: str) -> bool:
        return self.flags[name]


def parse_zones(cfg: Mapping[str, Any], flags: Mapping[str, bool]) -> tuple[Zone, ...]:
    """The ``zones`` setting; ``flags`` are the per-zone booleans allowed, with defaults."""
    raw = cfg.get("zones")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("zones", "is required: a list of tables with zone and symbol")
    zones: list[Zone] = []
    for i, z in enumerate(raw):
        key = f"zones[{i}]"
        if not isinstance(z, Mapping):
            raise ConfigError(key, "must be a table with zone and symbol")
        try:
            check_keys(z, {"zone", "symbol", "codes", "bits", *flags})
            zones.append(_zone(z, flags))
        except ConfigError as e:
            raise ConfigError(f"{key}.{e.key}", e.reason,
                              tuple((f"{key}.{k}", r) for k, r in e.every[1:])) from None
    return tuple(zones)


def _zone(z: Mapping[str, Any], flags: Mapping[str, bool]) -> Zone:
    name = z.get("zone")
    if not isinstance(name, str) or not valid_domain(name.rstrip(".").lower()):
        raise ConfigError("zone", "must be a domain name")
    symbol = z.get("symbol")
    if not isinstance(symbol, str) or not SYMBOL_RE.match(symbol):
        raise ConfigError("symbol", "must be an UPPER_CASE symbol name")
    if "codes" in z and "bits" in z:
        raise ConfigError("bits", "give codes or bits, not both")
    codes: dict[str, str] = {}
    for code, suffix in _table(z, "codes").items():
        try:
            addr = ipaddress.IPv4Address(code)
        except ValueError:
            raise ConfigError("codes", f"{code!r} is not an IPv4 address") from None
        if addr not in LOOPBACK_NET or _is_error(addr):
            raise ConfigError("codes", f"{code} is not a listing code (127.0.0.2-127.255.254.255)")
        codes[str(addr)] = suffix
    bits: list[tuple[int, str]] = []
    for mask, suffix in _table(z, "bits").items():
        if not mask.isdigit() or not 1 <= int(mask) <= 255:
            raise ConfigError("bits", f"{mask!r} is not a bit mask 1-255")
        bits.append((int(mask), suffix))
    got = {k: boolean(z, k, d) for k, d in flags.items()}
    return Zone(name.rstrip(".").lower(), symbol, codes, tuple(sorted(bits)), got)


def _table(z: Mapping[str, Any], key: str) -> dict[str, str]:
    v = z.get(key, {})
    if not isinstance(v, Mapping) or not all(isinstance(s, str) and SUFFIX_RE.match(s)
                                             for s in v.values()):
        raise ConfigError(key, "must be a table of code = \"SUFFIX\" (UPPER_CASE)")
    return dict(v)


def valid_domain(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and len(labels) >= 2 and all(LABEL_RE.match(x) for x in labels)


def reversed_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``4.3.2.1`` for 1.2.3.4; the 32 nibbles, least significant first, for IPv6."""
    return ip.reverse_pointer.rsplit(".", 2)[0]


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_error(addr: ipaddress.IPv4Address) -> bool:
    return addr not in LOOPBACK_NET or addr == NOT_LISTED or addr in ERROR_NET


@dataclass
class Findings:
    """Symbols collected from many answers: name -> options (items, codes), in order."""

    hits: dict[str, list[str]] = field(default_factory=dict)
    listed: dict[str, list[str]] = field(default_factory=dict)  # zone -> items listed there

    def add(self, symbol: str, option: str) -> None:
        opts = self.hits.setdefault(symbol, [])
        if option not in opts:
            opts.append(option)

    def symbols(self) -> tuple[Symbol, ...]:
        return tuple(Symbol(name, tuple(opts[:MAX_OPTIONS])) for name, opts in self.hits.items())


def read_answer(zone: Zone, item: str, ans: DnsAnswer, found: Findings) -> None:
    """Add what one zone's answer for ``item`` (an IP or a domain) means to ``found``."""
    if ans.status in ("nxdomain", "nodata"):
        return
    if ans.status == "temperror":
        found.add(f"{zone.symbol}_TEMPERROR", ans.error or "temperror")
        return
    if ans.status == "permerror":
        event(log, "dnsbl_error", logging.WARNING, zone=zone.zone, item=item, error=ans.error)
        return
    addrs = [ipaddress.IPv4Address(str(r)) for r in ans.records]
    bad = [a for a in addrs if _is_error(a)]
    if bad:  # the list refused us or the answer is bogus: never a listing
        for a in bad:
            found.add(f"{zone.symbol}_BLOCKED", str(a))
        event(log, "dnsbl_blocked", logging.WARNING, zone=zone.zone, item=item,
              codes=[str(a) for a in addrs])
        return
    if addrs:
        found.listed.setdefault(zone.zone, []).append(item)
    for a in addrs:
        code = str(a)
        if zone.bits:
            last = int(a) & 0xFF
            named = [s for mask, s in zone.bits if last & mask == mask]
            for s in named:
                found.add(f"{zone.symbol}_{s}", item)
            if not named:
                found.add(zone.symbol, f"{item}={code}")
        elif code in zone.codes:
            found.add(f"{zone.symbol}_{zone.codes[code]}", item)
        else:
            found.add(zone.symbol, f"{item}={code}")


async def lookup_all(dns: Resolver, queries: Sequence[tuple[Zone, str, str]],
                     timeout_s: float) -> tuple[Findings, int]:
    """Ask every ``(zone, item, name)`` A query at once under one deadline; the findings and
    how many were not answered in time (each such zone gets a temperror)."""
    found = Findings()
    if not queries:
        return found, 0
    tasks = [asyncio.ensure_future(dns.query(name, "A")) for _, _, name in queries]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    finally:
        for t in tasks:
            t.cancel()  # no-op for the finished ones
    late = 0
    for (zone, item, _), task in zip(queries, tasks, strict=True):
        if task in pending:
            late += 1
            found.add(f"{zone.symbol}_TEMPERROR", f"timed out after {timeout_s:g}s")
            continue
        read_answer(zone, item, task.result(), found)  # an exception propagates: on_error
    return found, late


def timing(cfg: Mapping[str, Any], max_lookups: int) -> tuple[float, int]:
    return positive(cfg, "dns_timeout_s", 5.0), integer(cfg, "max_lookups", max_lookups, 1)


def shared_resolver(services: Services) -> DnsResolver:
    return getattr(services, "resolver", None) or DnsResolver(DnsConfig())


def result(found: Findings, data: dict[str, Any], extra: Iterable[Symbol] = ()) -> Result:
    data["listed"] = {z: items[:MAX_OPTIONS] for z, items in found.listed.items()}
    return Result(symbols=(*found.symbols(), *extra), data=data)


class DnsblFilter(Filter):
    name = "dnsbl"

    def __init__(self, resolver: Resolver, zones: tuple[Zone, ...], *, dns_timeout_s: float = 5.0,
                 max_lookups: int = 20, skip_private: bool = True) -> None:
        self.resolver = resolver
        self.zones = zones
        self.dns_timeout_s = dns_timeout_s
        self.max_lookups = max_lookups
        self.skip_private = skip_private

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> DnsblFilter:
        check_keys(cfg, {"zones", "dns_timeout_s", "max_lookups", "skip_private"})
        zones = parse_zones(cfg, {"ipv4": True, "ipv6": False})
        timeout_s, max_lookups = timing(cfg, 20)
        return cls(shared_resolver(services), zones, dns_timeout_s=timeout_s,
                   max_lookups=max_lookups, skip_private=boolean(cfg, "skip_private", True))

    async def on_connect(self, ctx: FilterContext) -> Result:
        ip = client_address(ctx.client.ip)
        if ctx.client.trusted:
            return Result(data={"skipped": "trusted client"})
        if ip is None:
            return Result(data={"skipped": f"not an IP address: {ctx.client.ip[:64]}"})
        if self.skip_private and not ip.is_global:
            return Result(data={"skipped": f"not a global address: {ip}"})
        family = "ipv4" if ip.version == 4 else "ipv6"
        zones = [z for z in self.zones if z.flag(family)]
        queries = [(z, str(ip), f"{reversed_ip(ip)}.{z.zone}") for z in zones]
        skipped = len(queries) - self.max_lookups
        queries = queries[:self.max_lookups]
        # connect stage: no message yet, so ctx.dns is None and this is the shared resolver
        found, late = await lookup_all(per_message(ctx.dns, self.resolver), queries,
                                       self.dns_timeout_s)
        data: dict[str, Any] = {"ip": str(ip), "lookups": len(queries), "timed_out": late}
        if skipped > 0:
            data["not_checked"] = skipped
        return result(found, data)
