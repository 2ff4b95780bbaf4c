"""The gateway's DNS resolver: a ``dns.asyncresolver.Resolver`` (dnspython) configured from
``[dns]``, with one deadline per query, giving answers as values — ``ok``, ``nxdomain``,
``nodata``, ``temperror``, ``permerror`` — so that each caller (MX routing now; SPF, DKIM and
DMARC later) decides what each outcome means for it.

When ``dns.nameservers`` names servers, only those are asked: ``/etc/resolv.conf`` is never
read. When it is empty, the system's resolv.conf is (at the first query, not at start-up, so a
gateway that needs no DNS runs without one). There is no cache and no search list: every name
is absolute.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.resolver

from gateway.logs import event
from gateway.policy.schema import DnsConfig

log = logging.getLogger("mailgate.dns")

Status = Literal["ok", "nxdomain", "nodata", "temperror", "permerror"]
PER_SERVER_S = 2.0  # one server's turn before the next is asked, within the query's deadline
BACKSTOP_S = 0.5  # the hard deadline is timeout_s plus this, in case dnspython overruns


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


class DnsResolver:
    """Build one per policy; share it between the tasks of one event loop."""

    def __init__(self, cfg: DnsConfig) -> None:
        self.cfg = cfg
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._error = ""

    @property
    def nameservers(self) -> tuple[str, ...]:
        """Where queries go, as ``ip:port`` (reads resolv.conf if the policy names none)."""
        r = self._get()
        return () if r is None else tuple(_ns_text(ns, r.port) for ns in r.nameservers)

    def _get(self) -> dns.asyncresolver.Resolver | None:
        if self._resolver is None and not self._error:
            try:
                self._resolver = self._build()
            except dns.resolver.NoResolverConfiguration as e:
                self._error = f"no DNS servers: none in [dns] nameservers, and resolv.conf: {e}"
                log.error("%s", self._error)
        return self._resolver

    def _build(self) -> dns.asyncresolver.Resolver:
        if self.cfg.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)  # never reads /etc/resolv.conf
            r.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                             for host, port in self.cfg.nameservers]
            source = "policy"
        else:
            r = dns.asyncresolver.Resolver(configure=True)
            source = "resolv.conf"
        r.lifetime = self.cfg.timeout_s
        r.timeout = min(PER_SERVER_S, self.cfg.timeout_s)
        r.cache = None
        event(log, "dns_resolver", source=source, timeout_s=self.cfg.timeout_s,
              nameservers=[_ns_text(ns, r.port) for ns in r.nameservers])
        return r

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """One lookup of ``name`` (absolute; IDNA-encoded if it is not ASCII), done or given up
        within ``dns.timeout_s``."""
        r = self._get()
        if r is None:
            return DnsAnswer(name, rdtype, "temperror", error=self._error)
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rdtype, "permerror", error=f"bad domain name: {e}")
        timeout_s = self.cfg.timeout_s
        try:
            async with asyncio.timeout(timeout_s + BACKSTOP_S):
                ans = await r.resolve(qname, rdtype, search=False, lifetime=timeout_s)
        except dns.resolver.NXDOMAIN:
            return DnsAnswer(name, rdtype, "nxdomain", error="no such domain (NXDOMAIN)")
        except dns.resolver.NoAnswer:
            return DnsAnswer(name, rdtype, "nodata")
        except dns.resolver.YXDOMAIN as e:
            return DnsAnswer(name, rdtype, "permerror", error=str(e))
        except (dns.exception.Timeout, TimeoutError):
            return DnsAnswer(name, rdtype, "temperror", error=f"timed out after {timeout_s:g}s")
        except dns.resolver.NoNameservers as e:
            errors = e.kwargs.get("errors") or []
            if errors and all(isinstance(err[3], dns.message.ChainTooLong) for err in errors):
                # a CNAME loop is the zone's fault, not a passing failure: it will not heal
                return DnsAnswer(name, rdtype, "permerror", error="CNAME chain too long (loop)")
            return DnsAnswer(name, rdtype, "temperror", error=str(e) or type(e).__name__)
        except dns.exception.DNSException as e:  # SERVFAIL, REFUSED, unreachable
            return DnsAnswer(name, rdtype, "temperror", error=str(e) or type(e).__name__)
        rrset = ans.rrset
        return DnsAnswer(name, rdtype, "ok", tuple(rrset) if rrset is not None else (),
                         canonical=ans.canonical_name.to_text(omit_final_dot=True))


def _ns_text(ns: Any, default_port: int) -> str:
    if isinstance(ns, str):
        address, port = ns, default_port
    else:
        address, port = getattr(ns, "address", str(ns)), getattr(ns, "port", default_port)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``IPv6`` or ``[IPv6]:PORT`` (an address: the resolver's own name
    cannot be looked up)."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, sep, port = host[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be IP, IP:PORT or [IPv6]:PORT, got {text!r}")
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must be an IP address (optionally :PORT), got {text!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)
