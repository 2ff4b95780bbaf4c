"""filters/spf.py replaces pyspf's module-level ``DNSLookup`` so that SPF's lookups go through
the gateway's resolver (patch ``pyspf.dns-lookup``). The check evaluates a known record through
the replacement first; when pyspf no longer fits it, pyspf keeps its own DNS (in a worker
thread), one warning names the patch, and SPF still gives the right results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import spf

import filters.spf as spf_filter
from gateway import patches
from gateway.dnsresolver import DnsResolver
from gateway.policy.schema import DnsConfig
from tests.support.patches import kept_patch_status, patch_warnings


@pytest.fixture
def restored() -> Iterator[None]:
    lookup, bridge = spf.DNSLookup, spf_filter.DNS_BRIDGE
    with kept_patch_status():
        yield
    spf.DNSLookup, spf_filter.DNS_BRIDGE = lookup, bridge


def own_dns(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """pyspf's own DNS, for the test: example.org publishes an SPF record."""
    if (name, qtype) == ("example.org", "TXT"):
        return [(("example.org", "TXT"), [b"v=spf1 ip4:203.0.113.0/24 -all"])]
    return []


def verdicts(f: spf_filter.SpfFilter) -> list[str]:
    async def main() -> list[str]:
        out = []
        for ip in ("203.0.113.9", "198.51.100.9"):
            res = await f.check(ip, "bob@example.org", "mx.example.org", "mailfrom",
                                "example.org")
            out.append(res.symbols[0].name)
        return out

    return asyncio.run(main())


def test_the_bridge_is_checked_and_installed_here():
    assert patches.active("pyspf.dns-lookup") and spf.DNSLookup is spf_filter._dispatch


def test_a_pyspf_that_no_longer_fits_keeps_its_own_dns(restored, monkeypatch, caplog):
    monkeypatch.setattr(spf_filter, "_to_pyspf", lambda answer, name, qtype: [])  # shape changed
    spf.DNSLookup = spf_filter._PYSPF_LOOKUP
    patches.forget("pyspf.dns-lookup")
    spf_filter.DNS_BRIDGE = patches.install("pyspf.dns-lookup", spf_filter.check_dns_bridge,
                                            spf_filter._apply_dns_bridge)
    assert patch_warnings(caplog) == ["patch pyspf.dns-lookup disabled, the library's own path is "
                                      "used: a known record gave 'none' for 192.0.2.7, not pass"]
    assert spf.DNSLookup is spf_filter._PYSPF_LOOKUP  # pyspf's own, untouched
    monkeypatch.setattr(spf, "DNSLookup", own_dns)  # (standing in for the host's DNS)
    f = spf_filter.SpfFilter(DnsResolver(DnsConfig(nameservers=(("127.0.0.1", 9),))),
                             timeout_s=5)
    assert verdicts(f) == ["SPF_PASS", "SPF_FAIL"]


def test_a_pyspf_that_stopped_calling_dnslookup_is_detected(restored, monkeypatch, caplog):
    def dns(self: Any, name: str, qtype: str, cnames: Any = None, ignore_void: bool = False
            ) -> list[Any]:  # a pyspf that resolves some other way
        return []

    monkeypatch.setattr(spf.query, "dns", dns)
    patches.forget("pyspf.dns-lookup")
    assert not patches.install("pyspf.dns-lookup", spf_filter.check_dns_bridge)
    assert patch_warnings(caplog) == ["patch pyspf.dns-lookup disabled, the library's own path is "
                                      "used: pyspf's query.dns no longer calls DNSLookup"]


def test_pyspfs_own_dns_asks_the_configured_nameservers_not_resolv_conf(restored, monkeypatch,
                                                                         caplog):
    """With the bridge disabled, pyspf's own DNS (dnspython's default resolver) must still ask
    only ``[dns] nameservers`` (docs/policy.md: resolv.conf is never read when they are named).
    The old fallback asked the host's resolver: here a closed loopback port stands in for it
    (the test sends nothing off the box), and every check was SPF_TEMPERROR; on a real host,
    SPF was decided by another resolver than the one the policy names."""
    import dns.nameserver
    import dns.resolver

    from tests.support.dnsserver import DnsServer, closed_udp_port

    host = dns.resolver.Resolver(configure=False)  # "the host's resolver", dead
    host.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", closed_udp_port())]
    monkeypatch.setattr(dns.resolver, "default_resolver", host)
    monkeypatch.setattr(spf_filter, "_to_pyspf", lambda answer, name, qtype: [])  # shape changed
    spf.DNSLookup = spf_filter._PYSPF_LOOKUP
    patches.forget("pyspf.dns-lookup")
    spf_filter.DNS_BRIDGE = patches.install("pyspf.dns-lookup", spf_filter.check_dns_bridge,
                                            spf_filter._apply_dns_bridge)
    assert not spf_filter.DNS_BRIDGE and len(patch_warnings(caplog)) == 1
    zone = 'example.org. 60 IN TXT "v=spf1 ip4:203.0.113.0/24 -all"\n'
    with DnsServer(zone) as ns:
        f = spf_filter.SpfFilter(DnsResolver(DnsConfig(nameservers=(("127.0.0.1", ns.port),))),
                                 timeout_s=5)
        assert verdicts(f) == ["SPF_PASS", "SPF_FAIL"]  # old code: two SPF_TEMPERROR
        assert ("example.org", "TXT", "udp") in ns.queries
