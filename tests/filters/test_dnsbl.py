"""The dnsbl filter: the client IP looked up in blocklist zones served by a DNS server on
loopback (tests/support/dnsserver.py), through the gateway's resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from typing import Any

import pytest

from filters.dnsbl import DnsblFilter, reversed_ip
from gateway.dnsresolver import DnsResolver
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage, Symbol
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from tests.support.dnsserver import DnsServer

V6 = "2001:db8::1"
V6_REVERSED = ".".join(reversed("20010db8" + "0" * 23 + "1"))

ZONE = "".join(f"{name}. 60 IN A {addr}\n" for name, addr in [
    ("2.0.0.127.rbl.test", "127.0.0.2"),  # RFC 5782 §5 test entry: listed
    ("2.0.0.127.other.test", "127.0.0.3"),
    ("10.2.0.192.rbl.test", "127.0.0.2"),  # several codes in one answer
    ("10.2.0.192.rbl.test", "127.0.0.4"),
    ("11.2.0.192.rbl.test", "127.0.0.10"),  # a code the policy does not name
    ("12.2.0.192.rbl.test", "127.255.255.254"),  # Spamhaus: query via a public resolver
    ("14.2.0.192.rbl.test", "192.0.2.99"),  # not a DNSBL answer at all
    ("15.2.0.192.rbl.test", "127.0.0.1"),  # RFC 5782 §5: never a listing
    (f"{V6_REVERSED}.rbl.test", "127.0.0.4"),
]) + "15.2.0.192.other.test. 60 IN TXT \"not an A\"\n"

ZONES: list[dict[str, Any]] = [
    {"zone": "rbl.test", "symbol": "RBL_TEST", "codes": {"127.0.0.2": "SBL", "127.0.0.4": "XBL"},
     "ipv6": True},
    {"zone": "other.test", "symbol": "RBL_OTHER"},
]


@pytest.fixture(scope="module")
def ns() -> Iterator[DnsServer]:
    with DnsServer(ZONE, drop=["13.2.0.192.rbl.test"],
                   servfail=["16.2.0.192.rbl.test"]) as server:
        yield server


def make(ns: DnsServer, **cfg: Any) -> DnsblFilter:
    resolver = DnsResolver(DnsConfig(nameservers=(("127.0.0.1", ns.port),), timeout_s=2.0))
    settings: dict[str, Any] = {"zones": ZONES, "skip_private": False, **cfg}
    return DnsblFilter.from_config(settings, Services(resolver=resolver))


def connect(f: DnsblFilter, ip: str, trusted: bool = False) -> Result:
    ctx = FilterContext(stage=Stage.CONNECT, qid="S000000000000QID",
                        client=Client(ip, 40000, trusted=trusted))
    return asyncio.run(f.on_connect(ctx))


def asked(ns: DnsServer, ip: str) -> list[str]:
    rev = reversed_ip(ipaddress.ip_address(ip))
    return [name for name, _, _ in ns.queries if name.startswith(rev + ".")]


def test_reversal_ipv4_and_ipv6_nibbles() -> None:
    assert reversed_ip(ipaddress.ip_address("192.0.2.1")) == "1.2.0.192"
    # RFC 5782 §2.4: 32 nibbles, least significant first
    assert reversed_ip(ipaddress.ip_address(V6)) == V6_REVERSED
    assert V6_REVERSED.startswith("1.0.0.0.") and V6_REVERSED.endswith(".8.b.d.0.1.0.0.2")


def test_listed_ipv4_gives_the_code_symbol_in_each_zone(ns: DnsServer) -> None:
    r = connect(make(ns), "127.0.0.2")
    assert set(r.symbols) == {Symbol("RBL_TEST_SBL", ("127.0.0.2",)),
                              Symbol("RBL_OTHER", ("127.0.0.2=127.0.0.3",))}
    assert r.data["listed"] == {"rbl.test": ["127.0.0.2"], "other.test": ["127.0.0.2"]}


def test_not_listed_gives_nothing(ns: DnsServer) -> None:
    r = connect(make(ns), "192.0.2.20")
    assert r.symbols == ()
    assert sorted(asked(ns, "192.0.2.20")) == ["20.2.0.192.other.test", "20.2.0.192.rbl.test"]


def test_listed_ipv6_by_nibbles_only_in_ipv6_zones(ns: DnsServer) -> None:
    r = connect(make(ns), V6)
    assert r.symbols == (Symbol("RBL_TEST_XBL", (V6,)),)
    assert asked(ns, V6) == [f"{V6_REVERSED}.rbl.test"]  # other.test has ipv6 = false


def test_ipv4_mapped_ipv6_client_is_looked_up_as_ipv4(ns: DnsServer) -> None:
    r = connect(make(ns), "::ffff:127.0.0.2")
    assert Symbol("RBL_TEST_SBL", ("127.0.0.2",)) in r.symbols


def test_several_codes_in_one_answer_give_several_symbols(ns: DnsServer) -> None:
    r = connect(make(ns), "192.0.2.10")
    assert set(r.symbols) == {Symbol("RBL_TEST_SBL", ("192.0.2.10",)),
                              Symbol("RBL_TEST_XBL", ("192.0.2.10",))}


def test_unknown_listing_code_gives_the_generic_symbol(ns: DnsServer) -> None:
    r = connect(make(ns), "192.0.2.11")
    assert r.symbols == (Symbol("RBL_TEST", ("192.0.2.11=127.0.0.10",)),)


@pytest.mark.parametrize(("ip", "code"), [("192.0.2.12", "127.255.255.254"),
                                          ("192.0.2.14", "192.0.2.99"),
                                          ("192.0.2.15", "127.0.0.1")])
def test_error_answers_are_not_listings(ns: DnsServer, ip: str, code: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    r = connect(make(ns), ip)
    assert r.symbols == (Symbol("RBL_TEST_BLOCKED", (code,)),)
    assert r.data["listed"] == {}
    assert any(rec.getMessage() == "dnsbl_blocked" for rec in caplog.records)


def test_a_dropped_query_times_out_within_the_deadline(ns: DnsServer) -> None:
    f = make(ns, dns_timeout_s=0.5)
    t0 = time.monotonic()
    r = connect(f, "192.0.2.13")
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed
    assert r.symbols == (Symbol("RBL_TEST_TEMPERROR", ("timed out after 0.5s",)),)
    assert r.data["timed_out"] == 1
    assert asked(ns, "192.0.2.13").count("13.2.0.192.other.test") == 1  # the other zone answered


def test_servfail_is_a_temperror_not_a_listing(ns: DnsServer) -> None:
    r = connect(make(ns), "192.0.2.16")
    assert [s.name for s in r.symbols] == ["RBL_TEST_TEMPERROR"]


def test_max_lookups_caps_the_queries(ns: DnsServer) -> None:
    r = connect(make(ns, max_lookups=1), "192.0.2.30")
    assert asked(ns, "192.0.2.30") == ["30.2.0.192.rbl.test"]
    assert r.data["lookups"] == 1 and r.data["not_checked"] == 1


def test_trusted_and_private_clients_are_not_looked_up(ns: DnsServer) -> None:
    before = len(ns.queries)
    assert connect(make(ns), "127.0.0.2", trusted=True).data["skipped"] == "trusted client"
    r = connect(make(ns, skip_private=True), "127.0.0.2")  # the default
    assert r.symbols == () and r.data["skipped"].startswith("not a global address")
    assert connect(make(ns, skip_private=True), "10.1.2.3").symbols == ()
    assert len(ns.queries) == before


def test_lookups_run_concurrently(ns: DnsServer) -> None:
    zones = [{"zone": f"z{i}.test", "symbol": f"RBL_Z{i}"} for i in range(5)]
    with DnsServer("", delay={f"40.2.0.192.z{i}.test": 0.4 for i in range(5)}) as slow:
        t0 = time.monotonic()
        r = connect(make(slow, zones=zones), "192.0.2.40")
        elapsed = time.monotonic() - t0
    assert r.symbols == () and r.data["lookups"] == 5
    assert elapsed < 1.2, elapsed  # five 0.4 s answers, at once


@pytest.mark.parametrize(("cfg", "key"), [
    ({}, "zones"),
    ({"zones": []}, "zones"),
    ({"zones": ["rbl.test"]}, "zones[0]"),
    ({"zones": [{"zone": "rbl.test"}]}, "zones[0].symbol"),
    ({"zones": [{"zone": "rbl", "symbol": "X"}]}, "zones[0].zone"),
    ({"zones": [{"zone": "rbl.test", "symbol": "lower"}]}, "zones[0].symbol"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "codes": {"10.0.0.2": "A"}}]},
     "zones[0].codes"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "codes": {"127.255.255.254": "A"}}]},
     "zones[0].codes"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "codes": {"127.0.0.2": "a b"}}]},
     "zones[0].codes"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "bits": {"256": "A"}}]}, "zones[0].bits"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "bits": {"2": "A"},
                 "codes": {"127.0.0.2": "B"}}]}, "zones[0].bits"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "ipv6": "yes"}]}, "zones[0].ipv6"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X", "ips": True}]}, "zones[0].ips"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X"}], "dns_timeout_s": 0}, "dns_timeout_s"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X"}], "max_lookups": 0}, "max_lookups"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X"}], "skip_private": 1}, "skip_private"),
    ({"zones": [{"zone": "rbl.test", "symbol": "X"}], "zone": "x"}, "zone"),
])
def test_bad_settings_name_the_key(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        DnsblFilter.from_config(cfg, Services())
    assert e.value.key == key
