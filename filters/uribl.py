"""The ``uribl`` filter: the domains of the URLs in a message looked up in URI blocklists
(SURBL, URIBL, Spamhaus DBL style), at the message stage.

URLs come from the shared MIME view (``gateway.mime.view``: text and HTML parts, href links
included), hosts from ``gateway.mime.url_host``. For each host the *registered domain* (the
organizational domain by the Public Suffix List, offline: ``sub.domain.co.uk`` ->
``domain.co.uk``) is asked as ``<domain>.<zone>``, and with ``full_host = true`` on a zone the
full host name too. A host that is an IP literal (``http://192.0.2.7/``) is asked reversed
(as ``dnsbl`` does) only in zones with ``ips = true``, and skipped elsewhere; a host that is
itself a public suffix, or no domain name, is skipped. Internationalised names are asked in
their IDNA (``xn--``) form. Each (name, zone) is asked once per message however often it
appears; domains in ``ignore_domains`` (a listed domain and its subdomains) are never asked.

At most ``max_lookups`` queries per message, in order of appearance; when there were more,
``URIBL_MAX_LOOKUPS`` (option: how many were not asked) says so. All are asked at once,
through the message's limited view of the shared ``[dns]`` resolver (so ``[dns]
max_queries_per_message`` bounds them too), under one deadline ``dns_timeout_s``.

Answers are read as in ``dnsbl``: ``<SYMBOL>_<NAME>`` by ``codes`` or, for SURBL-style zones,
by ``bits`` of the last octet (``bits = {"8" = "PH", "16" = "MW", "64" = "ABUSE", "128" =
"CR"}``); the generic ``<SYMBOL>`` for other 127.0.0.0/8 codes; ``<SYMBOL>_BLOCKED`` (not a
listing, logged) for error codes (outside 127.0.0.0/8, 127.0.0.1, 127.255.255.0/24);
``<SYMBOL>_TEMPERROR`` for a failed or late lookup. Options: the listed domains (at most 5).

Settings: ``zones`` (required; each ``zone``, ``symbol``, ``codes`` or ``bits``, ``ips``
(false), ``full_host`` (false)), ``dns_timeout_s`` (5), ``max_lookups`` (50),
``ignore_domains`` (``[]``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import gateway.mime
from filters.dmarc import org_domain, public_suffix
from filters.dnsbl import (
    Zone,
    lookup_all,
    parse_zones,
    result,
    reversed_ip,
    shared_resolver,
    timing,
    valid_domain,
)
from gateway.dnsresolver import Resolver, per_message
from gateway.filterapi import ConfigError, Filter, FilterContext, Result, Symbol
from gateway.services import Services
from gateway.settings import check_keys, str_list

TRUNCATED = "URIBL_MAX_LOOKUPS"


def registered(host: str) -> tuple[str, str] | None:
    """(registered domain, host) of a URL host in IDNA form, or None when it has none."""
    try:
        host = host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    if not valid_domain(host) or public_suffix(host) == host:
        return None
    return org_domain(host), host


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class UriblFilter(Filter):
    name = "uribl"

    def __init__(self, resolver: Resolver, zones: tuple[Zone, ...], *, dns_timeout_s: float = 5.0,
                 max_lookups: int = 50, ignore_domains: tuple[str, ...] = ()) -> None:
        self.resolver = resolver
        self.zones = zones
        self.dns_timeout_s = dns_timeout_s
        self.max_lookups = max_lookups
        self.ignore_domains = frozenset(ignore_domains)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> UriblFilter:
        check_keys(cfg, {"zones", "dns_timeout_s", "max_lookups", "ignore_domains"})
        zones = parse_zones(cfg, {"ips": False, "full_host": False})
        timeout_s, max_lookups = timing(cfg, 50)
        ignore = []
        for d in str_list(cfg, "ignore_domains"):
            d = d.strip().rstrip(".").lower()
            if not valid_domain(d):
                raise ConfigError("ignore_domains", f"{d!r} is not a domain name")
            ignore.append(d)
        return cls(shared_resolver(services), zones, dns_timeout_s=timeout_s,
                   max_lookups=max_lookups, ignore_domains=tuple(ignore))

    def _ignored(self, host: str) -> bool:
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.ignore_domains for i in range(len(labels) - 1))

    def queries(self, urls: tuple[str, ...]) -> list[tuple[Zone, str, str]]:
        """Every (zone, item, query name) for these URLs, in order, each once."""
        out: dict[str, tuple[Zone, str, str]] = {}

        def add(zone: Zone, item: str, name: str) -> None:
            out.setdefault(name, (zone, item, name))

        for url in urls:
            host = gateway.mime.url_host(url)
            if not host:
                continue
            ip = ip_literal(host)
            names = registered(host) if ip is None else None
            if ip is None and (names is None or self._ignored(names[1])):
                continue
            for zone in self.zones:
                if ip is not None:
                    if zone.flag("ips"):
                        add(zone, str(ip), f"{reversed_ip(ip)}.{zone.zone}")
                    continue
                assert names is not None
                domain, full = names
                add(zone, domain, f"{domain}.{zone.zone}")
                if zone.flag("full_host") and full != domain:
                    add(zone, full, f"{full}.{zone.zone}")
        return list(out.values())

    async def on_message(self, ctx: FilterContext) -> Result:
        assert ctx.message is not None
        view = await gateway.mime.view(ctx.message)
        queries = self.queries(view.urls)
        extra: list[Symbol] = []
        skipped = len(queries) - self.max_lookups
        if skipped > 0:
            queries = queries[:self.max_lookups]
            extra.append(Symbol(TRUNCATED, (f"{skipped} not checked",)))
        found, late = await lookup_all(per_message(ctx.dns, self.resolver), queries,
                                       self.dns_timeout_s)
        data: dict[str, Any] = {"urls": len(view.urls), "lookups": len(queries),
                                "timed_out": late, "not_checked": max(skipped, 0)}
        return result(found, data, extra)
