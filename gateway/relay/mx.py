"""MX routing (RFC 5321 §5.1, RFC 7505): the hosts, in the order to try them, that take mail for
a domain, each with its addresses.

* MX records are tried by preference, lowest first; hosts of equal preference in random order.
* No MX record (the name exists, NODATA) → the implicit MX: the domain's own A/AAAA records,
  as if it had one MX of preference 0 naming itself.
* A null MX (RFC 7505: the MX set is the root name ``.``, normally a single ``0 .``) → a
  permanent failure, ``556 5.1.10``. A ``.`` among real MX hosts (invalid by RFC 7505 §3) is
  skipped and the others are used.
* NXDOMAIN (or a name that cannot be a domain) → permanent ``550 5.1.2``; SERVFAIL, REFUSED,
  unreachable servers or the query deadline → temporary ``451 4.4.3``.
* Hosts whose address lookups all fail: ``451 4.4.3`` if any failed temporarily, else
  ``550 5.4.4`` (no route: MX hosts, or the implicit MX, without addresses).
* If one of our own names is an MX host, only hosts of lower preference are used (§5.1, against
  loops); none left → ``550 5.4.6``.
* CNAMEs are followed as dnspython follows them (the domain itself, or an MX host that is an
  alias, RFC 2181 §10.3 notwithstanding). An MX exchange that looks like an IP address is a name
  to DNS, looked up as one and never used as an address. An address-literal domain
  (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) needs no DNS: it is the one host.
* At most ``max_hosts`` hosts (after ordering) and ``max_addresses`` addresses each (IPv4 first).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Collection
from dataclasses import dataclass

from gateway.dnsresolver import DnsAnswer, DnsResolver

MAX_HOSTS = 5
MAX_ADDRESSES_PER_HOST = 4


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str  # the exchange (lowercase, no final dot), or the domain for the implicit MX
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MxResult:
    domain: str
    hosts: tuple[MxHost, ...] = ()  # in the order to try; empty on failure
    implicit: bool = False  # no MX record: the domain's own addresses
    code: int = 0  # on failure: the reply code, enhanced status and text for the recipient
    status: str = ""
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def permanent(self) -> bool:
        return self.code >= 500


def _fail(domain: str, code: int, status: str, text: str) -> MxResult:
    return MxResult(domain, code=code, status=status, text=text)


async def mx_route(domain: str, resolver: DnsResolver, *,
                   local_names: Collection[str] = (), max_hosts: int = MAX_HOSTS,
                   max_addresses: int = MAX_ADDRESSES_PER_HOST,
                   rng: random.Random | None = None) -> MxResult:
    """Where mail for ``domain`` goes; ``local_names``: our own host names (loop check)."""
    d = domain.lower().rstrip(".")
    if d.startswith("["):
        return _literal(d)
    ans = await resolver.query(d, "MX")
    if ans.status in ("nxdomain", "permerror"):
        return _fail(d, 550, "5.1.2", f"Bad destination domain {d}: {ans.error}")
    if ans.status == "temperror":
        return _fail(d, 451, "4.4.3", f"MX lookup for {d} failed: {ans.error}")
    implicit = not ans.records
    if implicit:
        candidates = [(0, d)]
    else:
        import dns.name  # loaded with the answer already (see gateway.dnsresolver)
        mx = [(int(r.preference), r.exchange) for r in ans.records]  # type: ignore[attr-defined]
        if all(exchange == dns.name.root for _, exchange in mx):
            return _fail(d, 556, "5.1.10", f"Recipient address has null MX ({d})")
        candidates = _order([(p, x.to_text(omit_final_dot=True).lower())
                             for p, x in mx if x != dns.name.root], rng)
    local = {n.lower().rstrip(".") for n in local_names}
    mine = [p for p, host in candidates if host in local]
    if mine:
        candidates = [(p, host) for p, host in candidates if p < min(mine)]
        if not candidates:
            return _fail(d, 550, "5.4.6", f"Mail for {d} loops back to myself")
    candidates = candidates[:max_hosts]
    found = await asyncio.gather(*(_addresses(h, resolver, max_addresses)
                                   for _, h in candidates))
    hosts = tuple(MxHost(h, p, addrs) for (p, h), (addrs, _) in zip(candidates, found,
                                                                    strict=True) if addrs)
    if hosts:
        return MxResult(d, hosts, implicit)
    failures = [a for _, answers in found for a in answers if not a.ok]
    what = f"{d} (no MX record)" if implicit else f"the MX hosts of {d}"
    detail = "; ".join(f"{a.name}/{a.rdtype}: {a.error or a.status}" for a in failures[:4])
    if any(a.status == "temperror" for a in failures):
        return _fail(d, 451, "4.4.3", f"Address lookup failed for {what}: {detail}")
    return _fail(d, 550, "5.4.4", f"No address for {what}" + (f": {detail}" if detail else ""))


def _order(mx: list[tuple[int, str]], rng: random.Random | None) -> list[tuple[int, str]]:
    """By preference; random among equal preferences; a host listed twice keeps its best."""
    shuffle = (rng or random).shuffle
    groups: dict[int, dict[str, None]] = {}
    for p, host in mx:
        groups.setdefault(p, {})[host] = None
    out: list[tuple[int, str]] = []
    seen: set[str] = set()
    for p in sorted(groups):
        group = [h for h in groups[p] if h not in seen]
        seen.update(group)
        shuffle(group)
        out += [(p, h) for h in group]
    return out


async def _addresses(host: str, resolver: DnsResolver, limit: int
                     ) -> tuple[tuple[str, ...], tuple[DnsAnswer, ...]]:
    answers = await asyncio.gather(resolver.query(host, "A"), resolver.query(host, "AAAA"))
    addrs: dict[str, None] = {}
    for ans in answers:
        for r in ans.records:
            ip = ipaddress.ip_address(r.address)  # type: ignore[attr-defined]
            if not ip.is_unspecified:
                addrs[str(ip)] = None
    return tuple(addrs)[:limit], answers


def _literal(d: str) -> MxResult:
    """``[192.0.2.1]`` / ``[ipv6:2001:db8::1]``: that address, no DNS (RFC 5321 §4.1.3)."""
    inner = d[1:-1] if d.endswith("]") else ""
    try:
        if inner.startswith("ipv6:"):
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(inner[5:])
        else:
            ip = ipaddress.IPv4Address(inner)
    except ValueError:
        return _fail(d, 550, "5.1.2", f"Bad destination address literal {d}")
    return MxResult(d, (MxHost(d, 0, (str(ip),)),), implicit=True)
