"""The spf filter: RFC 7208 results from a small zone on the loopback DNS server, the HELO
identity for the null sender, time budgets, settings validation, and both ways a check runs
(replayed on the event loop; in a worker thread past INLINE_ROUNDS lookups)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import spf

import filters.spf
from filters.spf import SpfFilter
from gateway.dnsresolver import DnsResolver
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage
from gateway.services import Services
from gateway.smtp.address import NULL, Address
from tests.support.dnsserver import DnsServer, silent_udp_port

ZONE = """
pass.test.        60 IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
fail.test.        60 IN TXT "v=spf1 ip4:198.51.100.1 -all exp=exp.fail.test"
exp.fail.test.    60 IN TXT "%{i} may not send for %{d}"
softfail.test.    60 IN TXT "v=spf1 ~all"
neutral.test.     60 IN TXT "v=spf1 ?all"
none.test.        60 IN TXT "just some text"
perm.test.        60 IN TXT "v=spf1 ip4:192.0.2.1 bogus:x -all"
twice.test.       60 IN TXT "v=spf1 -all"
twice.test.       60 IN TXT "v=spf1 +all"
temp.test.        60 IN TXT "v=spf1 include:broken.test -all"
slow.test.        60 IN TXT "v=spf1 include:hang.test -all"
mx.test.          60 IN TXT "v=spf1 mx -all"
mx.test.          60 IN MX 10 mail.mx.test.
mail.mx.test.     60 IN A 192.0.2.25
helo.test.        60 IN TXT "v=spf1 a -all"
helo.test.        60 IN A 192.0.2.9
chain.test.       60 IN TXT "v=spf1 include:c1.chain.test -all"
c1.chain.test.    60 IN TXT "v=spf1 include:c2.chain.test -all"
c2.chain.test.    60 IN TXT "v=spf1 include:c3.chain.test -all"
c3.chain.test.    60 IN TXT "v=spf1 include:c4.chain.test -all"
c4.chain.test.    60 IN TXT "v=spf1 include:c5.chain.test -all"
c5.chain.test.    60 IN TXT "v=spf1 include:c6.chain.test -all"
c6.chain.test.    60 IN TXT "v=spf1 include:c7.chain.test -all"
c7.chain.test.    60 IN TXT "v=spf1 include:c8.chain.test ?all"
c8.chain.test.    60 IN TXT "v=spf1 a:host.chain.test -all"
host.chain.test.  60 IN A 192.0.2.77
"""


@pytest.fixture(scope="module")
def ns() -> Iterator[DnsServer]:
    with DnsServer(ZONE, servfail=["broken.test"], drop=["hang.test"]) as server:
        yield server


def make(ns_port: int, **cfg: object) -> SpfFilter:
    settings = {"dns_nameservers": [f"127.0.0.1:{ns_port}"], "dns_timeout_s": 0.5,
                "check_timeout_s": 2, **cfg}
    return SpfFilter.from_config(settings, Services(hostname="mx.receiver.test"))


def mail(f: SpfFilter, sender: Address, ip: str = "192.0.2.9",
         helo: str | None = "client.example") -> Result:
    ctx = FilterContext(stage=Stage.MAIL, qid="Q1", client=Client(ip, 25000, helo=helo),
                        sender=sender)
    return asyncio.run(f.on_mail(ctx))


@pytest.fixture(params=["replayed", "threaded", "mixed"])
def rounds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way a check can run: replayed on the loop (the default), all in a worker thread
    (INLINE_ROUNDS 0), one replay then the thread with the answers so far (INLINE_ROUNDS 1)."""
    n = {"replayed": filters.spf.INLINE_ROUNDS, "threaded": 0, "mixed": 1}[request.param]
    monkeypatch.setattr(filters.spf, "INLINE_ROUNDS", n)
    return str(request.param)


def symbol(r: Result) -> str:
    assert len(r.symbols) == 1
    return r.symbols[0].name


@pytest.mark.parametrize("domain,ip,expected", [
    ("pass.test", "192.0.2.9", "SPF_PASS"),
    ("fail.test", "192.0.2.9", "SPF_FAIL"),
    ("softfail.test", "192.0.2.9", "SPF_SOFTFAIL"),
    ("neutral.test", "192.0.2.9", "SPF_NEUTRAL"),
    ("none.test", "192.0.2.9", "SPF_NONE"),
    ("nxdomain.test", "192.0.2.9", "SPF_NONE"),
    ("perm.test", "203.0.113.7", "SPF_PERMERROR"),
    ("twice.test", "192.0.2.9", "SPF_PERMERROR"),
    ("temp.test", "192.0.2.9", "SPF_TEMPERROR"),
    ("mx.test", "192.0.2.25", "SPF_PASS"),
    ("mx.test", "192.0.2.26", "SPF_FAIL"),
    ("chain.test", "192.0.2.77", "SPF_PASS"),  # 10 lookups: past INLINE_ROUNDS
    ("chain.test", "192.0.2.78", "SPF_FAIL"),
])
def test_each_result(ns: DnsServer, rounds: str, domain: str, ip: str, expected: str) -> None:
    r = mail(make(ns.port), Address("alice", domain), ip=ip)
    assert symbol(r) == expected
    assert r.data["result"] == expected.removeprefix("SPF_").lower()
    assert r.data["domain"] == domain and r.data["identity"] == "mailfrom"


def test_options_carry_mechanism_and_explanation(ns: DnsServer, rounds: str) -> None:
    p = mail(make(ns.port), Address("alice", "pass.test"))
    assert p.symbols[0].options == ("ip4:192.0.2.0/24",)
    assert p.data["mechanism"] == "ip4:192.0.2.0/24"
    f = mail(make(ns.port), Address("alice", "fail.test"))
    assert f.symbols[0].options == ("-all", "192.0.2.9 may not send for fail.test")
    assert f.data["explanation"] == "192.0.2.9 may not send for fail.test"
    e = mail(make(ns.port), Address("alice", "perm.test"), ip="203.0.113.7")
    assert "bogus" in " ".join(e.symbols[0].options)


def test_a_check_runs_on_the_loop_until_it_needs_more_than_inline_rounds_lookups(
        ns: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    trips: list[object] = []
    real = asyncio.to_thread

    async def to_thread(func: Any, *args: object) -> object:
        trips.append(func)
        return await real(func, *args)

    monkeypatch.setattr(filters.spf.asyncio, "to_thread", to_thread)
    before = len(ns.queries)
    assert symbol(mail(make(ns.port), Address("a", "mx.test"), ip="192.0.2.25")) == "SPF_PASS"
    assert symbol(mail(make(ns.port), Address("a", "fail.test"))) == "SPF_FAIL"
    assert trips == []  # TXT, MX, A; TXT and the exp= TXT: replayed on the loop
    assert len(ns.queries) - before == 5  # each lookup made once, however many replays
    assert symbol(mail(make(ns.port), Address("a", "chain.test"), ip="192.0.2.77")) \
        == "SPF_PASS"
    assert len(trips) == 1  # 10 lookups: the thread took over after INLINE_ROUNDS
    assert len(ns.queries) - before == 5 + 10


def test_cached_answers_need_no_second_run_and_count_against_the_message_limit(
        ns: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    real = SpfFilter._run

    def counting(self: SpfFilter, *args: Any) -> Any:
        runs.append("run")
        return real(self, *args)

    monkeypatch.setattr(SpfFilter, "_run", counting)
    f = make(ns.port)
    resolver = f.resolver
    assert isinstance(resolver, DnsResolver)

    async def check(domain: str, ip: str = "192.0.2.25", limit: int = 20) -> Result:
        lim = resolver.limited(limit)
        ctx = FilterContext(stage=Stage.MAIL, qid="Q1", client=Client(ip, 1, helo="c.test"),
                            sender=Address("a", domain), dns=lim)
        r = await f.on_mail(ctx)
        counts.append(lim.count)
        return r

    async def main() -> list[str]:
        cold = await check("mx.test")
        cold_runs = len(runs)
        warm = await check("mx.test")
        assert len(runs) - cold_runs == 1  # every answer cached: one run, no replay
        starved = await check("mx.test", limit=1)  # TXT from the cache, then the limit
        return [symbol(cold), symbol(warm), symbol(starved), str(cold_runs)]

    counts: list[int] = []
    cold, warm, starved, cold_runs = asyncio.run(main())
    assert (cold, warm, starved) == ("SPF_PASS", "SPF_PASS", "SPF_TEMPERROR")
    assert int(cold_runs) == 4  # TXT, MX, A each missed once: four runs
    assert counts == [3, 3, 1]  # cache hits count as lookups, as an awaited query's do


def test_domain_is_checked_case_insensitively(ns: DnsServer) -> None:
    r = mail(make(ns.port), Address("Alice", "PASS.Test"))
    assert symbol(r) == "SPF_PASS" and r.data["domain"] == "pass.test"


def test_null_sender_uses_helo_identity(ns: DnsServer) -> None:
    before = len(ns.queries)
    r = mail(make(ns.port), NULL, ip="192.0.2.9", helo="helo.test")
    assert symbol(r) == "SPF_PASS"
    assert r.data["identity"] == "helo" and r.data["domain"] == "helo.test"
    assert ("helo.test", "TXT", "udp") in ns.queries[before:]
    bad = mail(make(ns.port), NULL, ip="192.0.2.10", helo="helo.test")
    assert symbol(bad) == "SPF_FAIL"


@pytest.mark.parametrize("helo", [None, "", "[192.0.2.9]"])
def test_null_sender_without_helo_domain_is_none(ns: DnsServer, helo: str | None) -> None:
    before = len(ns.queries)
    r = mail(make(ns.port), NULL, helo=helo)
    assert symbol(r) == "SPF_NONE" and r.data["identity"] == "helo"
    assert ns.queries[before:] == []


def test_address_literal_sender_is_none(ns: DnsServer) -> None:
    r = mail(make(ns.port), Address("a", "[192.0.2.9]", literal=True))
    assert symbol(r) == "SPF_NONE"


def test_dead_nameserver_is_temperror_within_budget() -> None:
    dead = silent_udp_port()
    try:
        f = make(dead.getsockname()[1], dns_timeout_s=0.3, check_timeout_s=1)
        t0 = time.monotonic()
        r = mail(f, Address("alice", "pass.test"))
        elapsed = time.monotonic() - t0
    finally:
        dead.close()
    assert symbol(r) == "SPF_TEMPERROR"
    assert elapsed < 1.5


def test_time_budget_caps_the_whole_check(ns: DnsServer, rounds: str) -> None:
    # each query may take 5 s, but the check as a whole has 0.5 s
    f = make(ns.port, dns_timeout_s=5, check_timeout_s=0.5)
    t0 = time.monotonic()
    r = mail(f, Address("alice", "slow.test"))
    assert symbol(r) == "SPF_TEMPERROR"
    assert time.monotonic() - t0 < 1.5


def test_cancelled_check_stops_its_thread(ns: DnsServer, rounds: str) -> None:
    f = make(ns.port, dns_timeout_s=5, check_timeout_s=5)
    ctx = FilterContext(stage=Stage.MAIL, qid="Q1", client=Client("192.0.2.9", 1),
                        sender=Address("alice", "slow.test"))

    async def run() -> float:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await f.on_mail(ctx)
        return time.monotonic() - t0

    # asyncio.run waits for the default executor: the thread must stop soon after the cancel
    t0 = time.monotonic()
    assert asyncio.run(run()) < 1
    assert time.monotonic() - t0 < 2


def test_pyspf_never_uses_its_own_resolver() -> None:
    # outside a check bound to the gateway resolver, pyspf's DNS hook refuses to look anything up
    with pytest.raises(spf.TempError):
        spf.DNSLookup("pass.test", "TXT", True, 1)
    assert spf.query(i="192.0.2.9", s="a@pass.test", h="x").check()[0] == "temperror"


@pytest.mark.parametrize("cfg,key", [
    ({"typo": 1}, "typo"),
    ({"check_timeout_s": 0}, "check_timeout_s"),
    ({"check_timeout_s": "5"}, "check_timeout_s"),
    ({"check_timeout_s": True}, "check_timeout_s"),
    ({"timeout_s": 5}, "timeout_s"),  # the loader's key, never the filter's
    ({"dns_timeout_s": -1}, "dns_timeout_s"),
    ({"dns_nameservers": "127.0.0.1"}, "dns_nameservers"),
    ({"dns_nameservers": ["dns.example"]}, "dns_nameservers"),
    ({"dns_nameservers": ["127.0.0.1:0"]}, "dns_nameservers"),
    ({"dns_nameservers": ["[::1"]}, "dns_nameservers"),
])
def test_bad_settings_name_the_key(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        SpfFilter.from_config(cfg, Services())
    assert e.value.key == key


def test_good_settings() -> None:
    f = SpfFilter.from_config({"dns_nameservers": ["192.0.2.53", "[2001:db8::53]:5353"],
                               "check_timeout_s": 3, "dns_timeout_s": 1.5}, Services())
    assert f.timeout_s == 3.0
    assert f.resolver.cfg.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    assert f.resolver.cfg.timeout_s == 1.5
    assert SpfFilter.from_config({}, Services()).timeout_s == 10.0


@pytest.mark.skipif("resolver" not in Services.__dataclass_fields__,
                    reason="Services carries no shared resolver yet")
def test_shared_resolver_is_used_unless_the_filter_names_servers() -> None:
    from gateway.dnsresolver import DnsResolver
    from gateway.policy.schema import DnsConfig

    shared = DnsResolver(DnsConfig(nameservers=(("192.0.2.53", 53),)))
    services = Services(resolver=shared)  # type: ignore[call-arg, unused-ignore]
    assert SpfFilter.from_config({}, services).resolver is shared
    own = SpfFilter.from_config({"dns_nameservers": ["192.0.2.54"]}, services).resolver
    assert own is not shared and own.cfg.nameservers == (("192.0.2.54", 53),)


def test_received_spf_header_is_optional(ns: DnsServer) -> None:
    sender = Address("joe", "pass.test")
    assert mail(make(ns.port), sender).edits == ()  # off by default
    r = mail(make(ns.port, received_spf=True), sender)
    [edit] = r.edits
    assert edit.name == "Received-SPF"  # type: ignore[union-attr]
    assert edit.value == (  # type: ignore[union-attr]
        "Pass (mx.receiver.test: domain of pass.test designates 192.0.2.9 as permitted "
        "sender) client-ip=192.0.2.9; envelope-from=\"joe@pass.test\"; "
        "helo=client.example; receiver=mx.receiver.test; mechanism=\"ip4:192.0.2.0/24\"; "
        "identity=mailfrom")
    fail = mail(make(ns.port, received_spf=True), Address("joe", "fail.test"))
    assert fail.edits[0].value.startswith("Fail (mx.receiver.test: domain of fail.test "  # type: ignore[union-attr]
                                          "does not designate 192.0.2.9")
    with pytest.raises(ConfigError):
        make(ns.port, received_spf="yes")
