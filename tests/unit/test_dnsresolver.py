"""The resolver's answer cache, in-flight sharing and per-message lookup limit
(gateway/dnsresolver.py), against a real authoritative DNS server on loopback
(tests/support/dnsserver.py), and the ``[dns]`` settings that control them.

Whether an answer came from the cache is read off the server: ``ns.queries`` records every
query that reached it. TTLs are 1 s where expiry matters, with one sleep just past them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.dnsresolver import DnsAnswer, DnsResolver, LimitedResolver, answer_now
from gateway.errors import PolicyError
from gateway.policy.loader import parse_policy
from gateway.policy.schema import DnsConfig
from tests.support.dnsserver import DnsServer

ZONE = """
short.test.     1 IN A 127.0.0.1
long.test.    300 IN A 127.0.0.2
long.test.    300 IN TXT "long"
alias.test.     1 IN CNAME long.test.
a.test.       300 IN A 127.0.0.3
b.test.       300 IN A 127.0.0.4
c.test.       300 IN A 127.0.0.5
slow.test.    300 IN A 127.0.0.6
"""
PAST_TTL_S = 1.15  # sleep just past a 1 s TTL


def make(ns: DnsServer, **cfg: Any) -> DnsResolver:
    cfg.setdefault("timeout_s", 1.0)
    return DnsResolver(DnsConfig(nameservers=(("127.0.0.1", ns.port),), **cfg))


def asked(ns: DnsServer, name: str, qtype: str = "A") -> int:
    """How many queries for (name, qtype) reached the server."""
    return sum(1 for n, t, _ in ns.queries if (n, t) == (name, qtype))


def addresses(ans: DnsAnswer) -> list[str]:
    return [r.to_text() for r in ans.records]


# -- positive answers ---------------------------------------------------------------------------

def test_positive_answer_is_cached_for_its_ttl_and_asked_again_after():
    async def main(ns: DnsServer) -> None:
        r = make(ns)
        first = await r.query("short.test", "A")
        assert first.status == "ok" and addresses(first) == ["127.0.0.1"]
        again = await r.query("SHORT.Test.", "a")  # same key: lowercased absolute name, type
        assert asked(ns, "short.test") == 1
        assert again.status == "ok" and addresses(again) == ["127.0.0.1"]
        assert (again.name, again.rdtype) == ("SHORT.Test.", "a")  # spelled as this caller asked
        assert r.cache_hits == 1 and r.upstream_queries == 1
        # a CNAME with TTL 1 to a name with TTL 300: the chain's smallest TTL counts
        assert (await r.query("alias.test", "A")).canonical == "long.test"
        assert (await r.query("long.test", "A")).ok
        await r.query("alias.test", "A")
        assert asked(ns, "alias.test") == 1 and asked(ns, "long.test") == 1

        await asyncio.sleep(PAST_TTL_S)
        assert addresses(await r.query("short.test", "A")) == ["127.0.0.1"]
        assert asked(ns, "short.test") == 2  # expired: asked again
        assert (await r.query("alias.test", "A")).ok
        assert asked(ns, "alias.test") == 2
        assert (await r.query("long.test", "A")).ok
        assert asked(ns, "long.test") == 1  # TTL 300: still cached

    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


def test_ttl_is_clamped_by_cache_max_and_min_ttl():
    async def main(ns: DnsServer) -> None:
        capped = make(ns, cache_max_ttl_s=1)
        floored = make(ns, cache_min_ttl_s=300)
        never = make(ns, cache_max_ttl_s=0)
        for r in (capped, floored, never):
            await r.query("long.test", "TXT")
            await r.query("short.test", "A")
            await r.query("long.test", "TXT")
            await r.query("short.test", "A")
        # capped and floored cached both; never cached nothing (2 queries each)
        assert asked(ns, "long.test", "TXT") == 4 and asked(ns, "short.test") == 4
        assert never.cache_size == 0
        await asyncio.sleep(PAST_TTL_S)
        await capped.query("long.test", "TXT")  # TTL 300 capped to 1 s: expired
        await floored.query("short.test", "A")  # TTL 1 raised to 300 s: still cached
        assert asked(ns, "long.test", "TXT") == 5 and asked(ns, "short.test") == 4

    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


# -- negative answers ---------------------------------------------------------------------------

def test_nxdomain_and_nodata_are_cached_for_the_soa_negative_ttl():
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) — either one being 1 gives 1 s."""
    async def main(small_min: DnsServer, small_ttl: DnsServer, default: DnsServer) -> None:
        rs = {ns: make(ns) for ns in (small_min, small_ttl, default)}
        for _ in range(2):
            for r in rs.values():
                nx = await r.query("missing.test", "A")
                assert nx.status == "nxdomain" and nx.error == "no such domain (NXDOMAIN)"
                nodata = await r.query("short.test", "MX")
                assert nodata.status == "nodata" and nodata.records == ()
        for ns in rs:
            assert (asked(ns, "missing.test"), asked(ns, "short.test", "MX")) == (1, 1)
        await asyncio.sleep(PAST_TTL_S)
        for r in rs.values():
            assert (await r.query("missing.test", "A")).status == "nxdomain"
            assert (await r.query("short.test", "MX")).status == "nodata"
        for ns in (small_min, small_ttl):  # negative TTL 1: asked again
            assert (asked(ns, "missing.test"), asked(ns, "short.test", "MX")) == (2, 2)
        # the test server's usual SOA: TTL 60, MINIMUM 60 — still cached
        assert (asked(default, "missing.test"), asked(default, "short.test", "MX")) == (1, 1)

    with DnsServer(ZONE, soa="test. 60 IN SOA ns.test. hostmaster.test. 1 60 60 60 1") as a, \
            DnsServer(ZONE, soa="test. 1 IN SOA ns.test. hostmaster.test. 1 60 60 60 60") as b, \
            DnsServer(ZONE) as c:
        asyncio.run(main(a, b, c))


def test_negative_answer_without_soa_is_not_cached():
    async def main(ns: DnsServer) -> None:
        r = make(ns)
        for _ in range(2):
            assert (await r.query("missing.test", "A")).status == "nxdomain"
            assert (await r.query("short.test", "MX")).status == "nodata"
        assert asked(ns, "missing.test") == 2 and asked(ns, "short.test", "MX") == 2
        assert r.cache_size == 0

    with DnsServer(ZONE, soa=None) as ns:
        asyncio.run(main(ns))


# -- errors are never cached --------------------------------------------------------------------

def test_servfail_and_timeout_are_not_cached():
    async def main(ns: DnsServer) -> None:
        r = make(ns, timeout_s=0.3)
        bad = await r.query("broken.test", "A")
        assert bad.status == "temperror"
        once = asked(ns, "broken.test")
        assert once >= 1
        assert (await r.query("broken.test", "A")).status == "temperror"
        assert asked(ns, "broken.test") == 2 * once  # the second query reached the server

        lost = await r.query("lost.test", "A")
        assert lost.status == "temperror" and lost.error == "timed out after 0.3s"
        once = asked(ns, "lost.test")
        assert once >= 1
        assert (await r.query("lost.test", "A")).status == "temperror"
        assert asked(ns, "lost.test") > once
        assert r.cache_size == 0

    with DnsServer(ZONE, servfail=["broken.test"], drop=["lost.test"]) as ns:
        asyncio.run(main(ns))


# -- size ---------------------------------------------------------------------------------------

def test_cache_max_entries_drops_the_least_recently_used():
    async def main(ns: DnsServer) -> None:
        r = make(ns, cache_max_entries=2)
        await r.query("a.test", "A")
        await r.query("b.test", "A")
        await r.query("a.test", "A")  # a is now the most recently used
        await r.query("c.test", "A")  # evicts b
        assert r.cache_size == 2
        assert [asked(ns, n) for n in ("a.test", "b.test", "c.test")] == [1, 1, 1]
        assert addresses(await r.query("a.test", "A")) == ["127.0.0.3"]
        assert addresses(await r.query("c.test", "A")) == ["127.0.0.5"]
        assert [asked(ns, n) for n in ("a.test", "c.test")] == [1, 1]  # both still cached
        assert addresses(await r.query("b.test", "A")) == ["127.0.0.4"]
        assert asked(ns, "b.test") == 2  # was evicted
        assert r.cache_size == 2

    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


def test_cache_max_entries_zero_disables_the_cache():
    async def main(ns: DnsServer) -> None:
        r = make(ns, cache_max_entries=0)
        for _ in range(3):
            assert addresses(await r.query("long.test", "A")) == ["127.0.0.2"]
            assert (await r.query("missing.test", "A")).status == "nxdomain"
        assert asked(ns, "long.test") == 3 and asked(ns, "missing.test") == 3
        assert r.cache_size == 0 and r.cache_hits == 0

    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


# -- queries in flight --------------------------------------------------------------------------

def test_concurrent_identical_queries_share_one_upstream_query():
    async def main(ns: DnsServer) -> None:
        for r in (make(ns), make(ns, cache_max_entries=0)):  # sharing needs no cache
            before = asked(ns, "slow.test")
            names = ["slow.test", "SLOW.test", "slow.test.", "Slow.Test", "slow.test"]
            answers = await asyncio.gather(*(r.query(n, "A") for n in names))
            assert asked(ns, "slow.test") == before + 1
            assert [a.name for a in answers] == names
            assert all(addresses(a) == ["127.0.0.6"] for a in answers)
            assert r.upstream_queries == 1
        # a different type is a different query
        r = make(ns)
        await asyncio.gather(r.query("long.test", "A"), r.query("long.test", "TXT"))
        assert asked(ns, "long.test", "A") == 1 and asked(ns, "long.test", "TXT") == 1

    with DnsServer(ZONE, delay={"slow.test": 0.2}) as ns:
        asyncio.run(main(ns))


def test_a_cancelled_waiter_does_not_cancel_the_query_for_the_others():
    async def main(ns: DnsServer) -> None:
        r = make(ns)
        first, second, third = (asyncio.ensure_future(r.query("slow.test", "A"))
                                for _ in range(3))
        await asyncio.sleep(0.1)  # the query is out, the answer 0.2 s away
        assert asked(ns, "slow.test") == 1
        first.cancel()  # the one that started the query
        answers = await asyncio.gather(second, third)
        assert all(a.ok and addresses(a) == ["127.0.0.6"] for a in answers)
        assert first.cancelled()
        assert asked(ns, "slow.test") == 1

        # every waiter gone: the query still completes and its answer is cached
        r = make(ns)
        lone = asyncio.ensure_future(r.query("slow.test", "A"))
        await asyncio.sleep(0.05)
        lone.cancel()
        await asyncio.sleep(0.4)
        assert asked(ns, "slow.test") == 2
        assert addresses(await r.query("slow.test", "A")) == ["127.0.0.6"]
        assert asked(ns, "slow.test") == 2

    with DnsServer(ZONE, delay={"slow.test": 0.3}) as ns:
        asyncio.run(main(ns))


# -- per-message lookup limit -------------------------------------------------------------------

def test_limited_resolver_answers_temperror_after_its_limit_without_asking():
    async def main(ns: DnsServer) -> None:
        r = make(ns, max_queries_per_message=7)
        assert r.limited().limit == 7  # the policy's setting by default
        lim = r.limited(3)
        assert isinstance(lim, LimitedResolver) and (lim.limit, lim.count) == (3, 0)
        results = [await lim.query("long.test", "A") for _ in range(2)]
        results.append(await lim.query("missing.test", "A"))
        assert [a.status for a in results] == ["ok", "ok", "nxdomain"]
        assert lim.count == 3 and not lim.refused and lim.exhausted  # cache hits count too
        over = await lim.query("c.test", "A")
        assert over == DnsAnswer("c.test", "A", "temperror",
                                 error="per-message DNS lookup limit (3) reached")
        assert (await lim.query("long.test", "A")).status == "temperror"  # even if cached
        assert (lim.count, lim.refused) == (3, 2)
        assert asked(ns, "c.test") == 0 and asked(ns, "long.test") == 1
        # another message has its own budget over the same shared cache
        other = r.limited(1)
        assert (await other.query("c.test", "A")).ok
        assert (await other.query("c.test", "A")).status == "temperror"
        assert other.count == 1 and lim.count == 3

    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


def test_query_nowait_answers_from_the_cache_only_and_counts_like_query():
    async def main(ns: DnsServer) -> None:
        r = make(ns)
        assert r.query_nowait("long.test", "A") is None  # not cached: nothing asked
        assert asked(ns, "long.test") == 0 and r.cache_hits == 0
        await r.query("long.test", "A")
        await r.query("short.test", "A")
        hit = r.query_nowait("LONG.test.", "a")
        assert hit is not None and addresses(hit) == ["127.0.0.2"]
        assert (hit.name, hit.rdtype) == ("LONG.test.", "a") and r.cache_hits == 1
        assert r.query_nowait("bad..name", "A") is None  # query() gives its permerror
        lim = r.limited(2)
        assert lim.query_nowait("c.test", "A") is None and lim.count == 0
        assert lim.query_nowait("long.test", "A") is not None and lim.count == 1
        await asyncio.sleep(PAST_TTL_S)
        assert lim.query_nowait("short.test", "A") is None and lim.count == 1  # expired
        assert answer_now(lim, "long.test", "A") is not None and lim.exhausted
        over = lim.query_nowait("long.test", "A")
        assert over is not None and over.status == "temperror" and lim.refused == 1
        assert asked(ns, "long.test") == 1

    class Plain:  # a resolver with query() only
        async def query(self, name: str, rdtype: str) -> DnsAnswer:
            raise AssertionError("not asked")

    assert answer_now(Plain(), "long.test", "A") is None
    assert LimitedResolver(Plain(), 5).query_nowait("long.test", "A") is None
    with DnsServer(ZONE) as ns:
        asyncio.run(main(ns))


# -- the [dns] settings -------------------------------------------------------------------------

SRC = "policies/test.toml"


def test_dns_cache_settings_are_read_and_default():
    assert parse_policy({}, SRC).dns == DnsConfig()
    d = DnsConfig()
    assert (d.cache_max_entries, d.cache_max_ttl_s, d.cache_min_ttl_s,
            d.max_queries_per_message) == (10000, 86400.0, 0.0, 100)
    p = parse_policy({"dns": {"cache_max_entries": 0, "cache_max_ttl_s": 600,
                              "cache_min_ttl_s": 1.5, "max_queries_per_message": 30}}, SRC)
    assert p.dns == DnsConfig(cache_max_entries=0, cache_max_ttl_s=600.0, cache_min_ttl_s=1.5,
                              max_queries_per_message=30)
    assert isinstance(p.dns.cache_max_ttl_s, float)


@pytest.mark.parametrize(("dns", "expected"), [
    ({"cache_max_entries": -1}, "dns.cache_max_entries: must be an integer >= 0"),
    ({"cache_max_entries": "10"}, "dns.cache_max_entries: must be an integer, got '10'"),
    ({"cache_max_entries": 1.5}, "dns.cache_max_entries: must be an integer, got 1.5"),
    ({"cache_max_entries": True}, "dns.cache_max_entries: must be an integer, got True"),
    ({"cache_max_ttl_s": -1}, "dns.cache_max_ttl_s: must be a number >= 0"),
    ({"cache_max_ttl_s": "1d"}, "dns.cache_max_ttl_s: must be a number, got '1d'"),
    ({"cache_min_ttl_s": -0.5}, "dns.cache_min_ttl_s: must be a number >= 0"),
    ({"cache_min_ttl_s": 60, "cache_max_ttl_s": 30},
     "dns.cache_min_ttl_s: must be <= dns.cache_max_ttl_s"),
    ({"max_queries_per_message": 0}, "dns.max_queries_per_message: must be an integer >= 1"),
    ({"max_queries_per_message": [5]},
     "dns.max_queries_per_message: must be an integer, got [5]"),
    ({"cache_size": 5}, "dns.cache_size: unknown key"),
])
def test_bad_dns_cache_settings_name_file_and_key(dns: dict[str, Any], expected: str):
    with pytest.raises(PolicyError) as exc:
        parse_policy({"dns": dns}, SRC)
    assert list(exc.value.problems) == [f"{SRC}: {expected}"]
