"""MX routing (gateway/relay/mx.py, RFC 5321 §5.1 and RFC 7505) and the resolver it uses
(gateway/dnsresolver.py), against a real authoritative DNS server on loopback
(tests/support/dnsserver.py, UDP and TCP); the ``mx`` transport and the ``[dns]`` policy section.

The resolver only ever talks to the test server: every test configures it with that server,
and one test proves that /etc/resolv.conf is not read when nameservers are given."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import dns.resolver
import pytest

from gateway.dnsresolver import DnsResolver
from gateway.errors import PolicyError, RelayPermError, RelayTempError
from gateway.policy.loader import parse_policy
from gateway.policy.schema import DnsConfig, RelayConfig
from gateway.relay.connect import connect_transport
from gateway.relay.mx import MAX_ADDRESSES_PER_HOST, MAX_HOSTS, MxHost, MxResult, mx_route
from gateway.relay.transport import Transport, parse_transport, transport_for
from tests.support.dnsserver import DnsServer, silent_udp_port
from tests.support.sink import Sink

LONG = "a-long-label-so-that-the-answer-needs-more-than-512-bytes"
ZONE = """
two.test.          60 IN MX 10 mx1.two.test.
two.test.          60 IN MX 20 mx2.two.test.
mx1.two.test.      60 IN A 127.0.0.2
mx2.two.test.      60 IN A 127.0.0.1
mx2.two.test.      60 IN AAAA ::1
equal.test.        60 IN MX 10 a.equal.test.
equal.test.        60 IN MX 10 b.equal.test.
equal.test.        60 IN MX 10 c.equal.test.
equal.test.        60 IN MX 20 z.equal.test.
a.equal.test.      60 IN A 127.0.0.11
b.equal.test.      60 IN A 127.0.0.12
c.equal.test.      60 IN A 127.0.0.13
z.equal.test.      60 IN A 127.0.0.14
implicit.test.     60 IN A 127.0.0.3
implicit.test.     60 IN TXT "no MX here"
null.test.         60 IN MX 0 .
nullish.test.      60 IN MX 0 .
nullish.test.      60 IN MX 10 real.nullish.test.
real.nullish.test. 60 IN A 127.0.0.4
noaddr.test.       60 IN MX 10 nowhere.noaddr.test.
literal.test.      60 IN MX 10 127.0.0.9.
literal2.test.     60 IN MX 10 127.0.0.9.
literal2.test.     60 IN MX 20 ok.literal2.test.
ok.literal2.test.  60 IN A 127.0.0.5
alias.test.        60 IN MX 10 mail.alias.test.
mail.alias.test.   60 IN CNAME host.alias.test.
host.alias.test.   60 IN A 127.0.0.6
cname.test.        60 IN CNAME two.test.
slowhost.test.     60 IN MX 10 slow.slowhost.test.
bare.test.         60 IN TXT "exists, but no MX and no address"
""" + "".join(f"many.test. 60 IN MX {i} h{i:02d}-{LONG}.many.test.\n"
              f"h{i:02d}-{LONG}.many.test. 60 IN A 127.0.1.{i + 1}\n" for i in range(12)) \
    + "".join(f"wide.test. 60 IN A 127.0.2.{i}\n" for i in range(1, 8))


@pytest.fixture(scope="module")
def ns() -> Iterator[DnsServer]:
    with DnsServer(ZONE, servfail=["servfail.test"],
                   drop=["dropped.test", "slow.slowhost.test"]) as server:
        yield server


def resolver_for(port: int, timeout_s: float = 2.0) -> DnsResolver:
    return DnsResolver(DnsConfig(nameservers=(("127.0.0.1", port),), timeout_s=timeout_s))


def route(ns: DnsServer, domain: str, **kw: Any) -> MxResult:
    return asyncio.run(mx_route(domain, resolver_for(ns.port), **kw))


def names(result: MxResult) -> list[str]:
    return [h.name for h in result.hosts]


# -- the resolver: only the configured server -------------------------------------------------

def test_resolver_uses_only_the_configured_nameserver_and_never_reads_resolv_conf(ns, monkeypatch):
    def forbidden(*a: Any, **kw: Any) -> None:
        raise AssertionError("/etc/resolv.conf read although [dns] nameservers are set")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", forbidden)
    r = resolver_for(ns.port)
    assert r.nameservers == (f"127.0.0.1:{ns.port}",)
    before = len(ns.queries)
    assert asyncio.run(mx_route("two.test", r)).ok
    assert ("two.test", "MX", "udp") in ns.queries[before:]
    # The same patch does bite when no nameservers are configured (resolv.conf is the fallback).
    with pytest.raises(AssertionError, match="resolv.conf"):
        _ = DnsResolver(DnsConfig(nameservers=())).nameservers


# -- RFC 5321 §5.1: preference order, random among equals, implicit MX -------------------------

def test_mx_hosts_come_by_preference_with_their_addresses(ns):
    for _ in range(5):  # no randomness across different preferences
        r = route(ns, "two.test")
        assert r.ok and not r.implicit and r.code == 0
        assert r.hosts == (MxHost("mx1.two.test", 10, ("127.0.0.2",)),
                           MxHost("mx2.two.test", 20, ("127.0.0.1", "::1")))  # IPv4 first


def test_equal_preferences_are_tried_in_random_order(ns):
    orders = set()
    for seed in range(20):
        r = route(ns, "equal.test", rng=random.Random(seed))
        assert sorted(names(r)[:3]) == ["a.equal.test", "b.equal.test", "c.equal.test"]
        assert names(r)[3] == "z.equal.test"  # the higher preference always comes last
        orders.add(tuple(names(r)[:3]))
    assert len(orders) > 1, "equal-preference MX hosts always in the same order"


def test_no_mx_record_means_the_implicit_mx_of_the_domain_itself(ns):
    r = route(ns, "implicit.test")
    assert r.ok and r.implicit
    assert r.hosts == (MxHost("implicit.test", 0, ("127.0.0.3",)),)


def test_domain_that_is_a_cname_is_routed_by_its_target(ns):
    assert names(route(ns, "cname.test")) == ["mx1.two.test", "mx2.two.test"]


def test_mx_host_that_is_a_cname_is_followed(ns):
    r = route(ns, "alias.test")
    assert r.hosts == (MxHost("mail.alias.test", 10, ("127.0.0.6",)),)


def test_mx_exchange_that_looks_like_an_ip_is_a_name_not_an_address(ns):
    """dnspython parses ``MX 10 127.0.0.9.`` as a host name; its A lookup is NXDOMAIN, so the
    host is unusable — 127.0.0.9 is never used as an address."""
    r = route(ns, "literal.test")
    assert not r.ok and r.permanent and (r.code, r.status) == (550, "5.4.4")
    assert ("127.0.0.9", "A", "udp") in ns.queries
    r = route(ns, "literal2.test")
    assert r.hosts == (MxHost("ok.literal2.test", 20, ("127.0.0.5",)),)


def test_hosts_and_addresses_are_capped_and_long_answers_come_over_tcp(ns):
    before = len(ns.queries)
    r = route(ns, "many.test")
    assert len(r.hosts) == MAX_HOSTS == 5
    assert [h.preference for h in r.hosts] == [0, 1, 2, 3, 4]
    assert ("many.test", "MX", "tcp") in ns.queries[before:]  # truncated over UDP, then TCP
    asked = {q[0] for q in ns.queries[before:] if q[1] == "A"}
    assert len(asked) == MAX_HOSTS  # hosts beyond the cap are not even looked up
    r = route(ns, "wide.test")
    assert r.implicit and len(r.hosts[0].addresses) == MAX_ADDRESSES_PER_HOST == 4
    assert route(ns, "two.test", max_hosts=1).hosts == (MxHost("mx1.two.test", 10,
                                                                ("127.0.0.2",)),)


def test_address_literal_domain_needs_no_dns(ns):
    before = len(ns.queries)
    r = route(ns, "[127.0.0.7]")
    assert r.hosts == (MxHost("[127.0.0.7]", 0, ("127.0.0.7",)),)
    assert route(ns, "[IPv6:::1]").hosts[0].addresses == ("::1",)
    assert ns.queries[before:] == []
    bad = route(ns, "[300.1.1.1]")
    assert (bad.code, bad.status) == (550, "5.1.2")


def test_we_are_an_mx_host_so_only_more_preferred_hosts_are_used(ns):
    r = route(ns, "two.test", local_names=["MX2.two.test."])
    assert names(r) == ["mx1.two.test"]
    r = route(ns, "two.test", local_names=["mx1.two.test"])
    assert (r.code, r.status) == (550, "5.4.6") and "loops back" in r.text


# -- failures: permanent and temporary ----------------------------------------------------------

def test_null_mx_fails_permanently_with_5_1_10(ns):
    before = len(ns.queries)
    r = route(ns, "null.test")
    assert not r.ok and r.permanent and r.hosts == ()
    assert (r.code, r.status) == (556, "5.1.10")
    assert r.text.startswith("Recipient address has null MX")
    assert ns.queries[before:] == [("null.test", "MX", "udp")]  # no address lookups at all


def test_a_root_exchange_among_real_mx_hosts_is_skipped(ns):
    assert route(ns, "nullish.test").hosts == (MxHost("real.nullish.test", 10, ("127.0.0.4",)),)


def test_nxdomain_fails_permanently_with_5_1_2(ns):
    r = route(ns, "no-such-domain.test")
    assert r.permanent and (r.code, r.status) == (550, "5.1.2") and "NXDOMAIN" in r.text
    bad = route(ns, "a..b.test")  # not a domain name at all
    assert bad.permanent and bad.status == "5.1.2"


def test_domain_without_any_route_fails_permanently_with_5_4_4(ns):
    for domain in ("bare.test", "noaddr.test"):  # no MX nor address / MX host without address
        r = route(ns, domain)
        assert r.permanent and (r.code, r.status) == (550, "5.4.4"), r


def test_servfail_is_a_temporary_4_4_3(ns):
    t0 = time.monotonic()
    r = route(ns, "servfail.test")
    assert not r.ok and not r.permanent and (r.code, r.status) == (451, "4.4.3")
    assert time.monotonic() - t0 < 1.5  # SERVFAIL is an answer: no waiting for the deadline


@pytest.mark.parametrize("timeout_s", [0.3, 0.8])
def test_a_nameserver_that_never_answers_is_a_temporary_4_4_3_within_timeout_s(timeout_s):
    sock = silent_udp_port()
    try:
        r = resolver_for(sock.getsockname()[1], timeout_s)
        t0 = time.monotonic()
        result = asyncio.run(mx_route("two.test", r))
        elapsed = time.monotonic() - t0
    finally:
        sock.close()
    assert (result.code, result.status) == (451, "4.4.3") and not result.permanent
    assert "timed out" in result.text
    assert timeout_s * 0.9 <= elapsed < timeout_s + 0.7, elapsed


def test_unanswered_queries_on_a_live_server_are_temporary_too(ns):
    r = asyncio.run(mx_route("dropped.test", resolver_for(ns.port, 0.3)))
    assert (r.code, r.status) == (451, "4.4.3")
    # An MX host whose address lookups time out: temporary, not "no address" (5.4.4).
    r = asyncio.run(mx_route("slowhost.test", resolver_for(ns.port, 0.3)))
    assert (r.code, r.status) == (451, "4.4.3") and "slow.slowhost.test" in r.text


# -- the mx transport: connecting in MX order ---------------------------------------------------

RELAY = RelayConfig(mode="queue", starttls="none", connect_timeout_s=2, command_timeout_s=5)


def connect(ns: DnsServer, domain: str, port: int) -> Any:
    async def go() -> None:
        t = transport_for(domain, Transport("mx", port=port), {})
        client = await connect_transport(t, RELAY, "gw.test", resolver_for(ns.port))
        await client.quit()
    return asyncio.run(go())


def test_the_preferred_mx_gets_the_connection(ns):
    with Sink(host="127.0.0.2") as preferred, Sink(host="127.0.0.1",
                                                   port=preferred.port) as backup:
        connect(ns, "two.test", preferred.port)
        assert preferred.connections == 1 and backup.connections == 0


def test_preferred_mx_down_the_next_one_is_used(ns):
    with Sink(host="127.0.0.1") as backup:  # nothing listens on 127.0.0.2 at that port
        connect(ns, "two.test", backup.port)
        assert backup.connections == 1


def test_all_mx_hosts_down_is_temporary_and_dns_failures_keep_their_status(ns):
    with Sink() as s:
        port = s.port
    with pytest.raises(RelayTempError) as temp:  # nothing listens anywhere: retry later
        connect(ns, "two.test", port)
    assert temp.value.status == "4.4.1" and "mx1.two.test[127.0.0.2]" in str(temp.value)
    with pytest.raises(RelayPermError) as perm:
        connect(ns, "null.test", port)
    assert (perm.value.code, perm.value.status) == (556, "5.1.10")
    with pytest.raises(RelayTempError) as dns_temp:
        connect(ns, "servfail.test", port)
    assert (dns_temp.value.code, dns_temp.value.status) == (451, "4.4.3")


# -- the transport and the policy --------------------------------------------------------------

def test_mx_transport_parses_and_is_bound_to_the_recipient_domain():
    assert parse_transport("mx") == Transport("mx", port=25)
    assert parse_transport("mx:2525") == Transport("mx", port=2525)
    for bad in ("mx:", "mx:0", "mx:x", "mx:70000"):
        with pytest.raises(ValueError):
            parse_transport(bad)
    by_domain = {".other.test": Transport("mx", port=2525)}
    a = transport_for("A.Other.Test", Transport("smtp", "h", 25), by_domain)
    b = transport_for("b.other.test", Transport("smtp", "h", 25), by_domain)
    assert (a.kind, a.port, a.domain) == ("mx", 2525, "a.other.test")
    assert a != b  # a queue groups (and pools connections) per domain
    assert str(a) == "mx:2525 (a.other.test)"
    assert transport_for("x.test", Transport("mx"), {}).domain == "x.test"


def test_dns_policy_section():
    p = parse_policy({"dns": {"nameservers": ["127.0.0.1:5353", "::1", "[::1]:53",
                                              "192.0.2.1"], "timeout_s": 0.5}}, "t.toml")
    assert p.dns == DnsConfig(nameservers=(("127.0.0.1", 5353), ("::1", 53), ("::1", 53),
                                           ("192.0.2.1", 53)), timeout_s=0.5)
    assert parse_policy({}, "t.toml").dns == DnsConfig(nameservers=(), timeout_s=5.0)
    with pytest.raises(PolicyError) as exc:
        parse_policy({"dns": {"nameservers": ["ns.example.test", "127.0.0.1:0", "[::1]"],
                              "timeout_s": 0, "retries": 3}}, "t.toml")
    got = "\n".join(exc.value.problems)
    assert "t.toml: dns.nameservers[0]: must be an IP address" in got
    assert "t.toml: dns.nameservers[1]: bad port" in got
    assert "t.toml: dns.nameservers[2]:" in got
    assert "t.toml: dns.timeout_s: must be a number > 0" in got
    assert "t.toml: dns.retries: unknown key" in got


def test_mx_needs_queue_mode():
    with pytest.raises(PolicyError) as exc:
        parse_policy({"relay": {"mode": "proxy", "downstream": "mx",
                                "transport": {"other.test": "mx:2525"}}}, "t.toml")
    assert list(exc.value.problems) == [
        't.toml: relay.downstream: mx routing needs relay.mode = "queue"',
        't.toml: relay.transport.other.test: mx routing needs relay.mode = "queue"']
    p = parse_policy({"relay": {"mode": "queue", "downstream": "mx"}}, "t.toml")
    assert p.relay.downstream == Transport("mx", port=25)
