"""The uribl filter: URL domains from text and HTML parts looked up in URI blocklist zones
served by a DNS server on loopback, through the gateway's resolver."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filters.uribl import UriblFilter, registered
from gateway.dnsresolver import DnsResolver, LimitedResolver
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage, Symbol
from gateway.message import Message
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from tests.support.dnsserver import DnsServer

ZONE = "".join(f"{name}. 60 IN A {addr}\n" for name, addr in [
    ("evil.test.uribl.test", "127.0.0.2"),
    ("domain.co.uk.uribl.test", "127.0.0.2"),
    ("htmlonly.test.uribl.test", "127.0.0.4"),
    ("refused.test.uribl.test", "127.0.0.1"),  # URIBL.com: "query refused"
    ("phish.test.multi.test", "127.0.0.24"),  # SURBL bits: 8 (PH) + 16 (MW)
    ("odd.test.multi.test", "127.0.0.32"),  # a bit the policy does not name
    ("7.2.0.192.multi.test", "127.0.0.64"),  # an IP literal, reversed
    ("bad.host.test.full.test", "127.0.0.2"),  # only the full host name is listed
])

URIBL = {"zone": "uribl.test", "symbol": "URIBL_TEST", "codes": {"127.0.0.2": "BLACK",
                                                                  "127.0.0.4": "GREY"}}
SURBL = {"zone": "multi.test", "symbol": "SURBL", "ips": True,
         "bits": {"8": "PH", "16": "MW", "64": "ABUSE"}}

TEXT_AND_HTML = """\
From: a@sender.test
To: b@example.test
Subject: links
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b"

--b
Content-Type: text/plain

See http://evil.test/a and https://WWW.Evil.Test/b?x and www.evil.test/c,
also http://sub.domain.co.uk/path and http://phish.test/login.
--b
Content-Type: text/html

<p>Click <a href="http://htmlonly.test/x">here</a> or <a href="http://evil.test/d">there</a>.
<img src="http://192.0.2.7/pixel.gif"></p>
--b--
"""


@pytest.fixture(scope="module")
def ns() -> Iterator[DnsServer]:
    with DnsServer(ZONE, drop=["slow.test.uribl.test"]) as server:
        yield server


def make(ns: DnsServer, zones: list[dict[str, Any]] | None = None, **cfg: Any) -> UriblFilter:
    resolver = DnsResolver(DnsConfig(nameservers=(("127.0.0.1", ns.port),), timeout_s=2.0))
    return UriblFilter.from_config({"zones": zones or [URIBL, SURBL], **cfg},
                                   Services(resolver=resolver))


def run(f: UriblFilter, tmp_path: Path, text: str, limit: int | None = None) -> Result:
    path = tmp_path / "msg"
    path.write_bytes(re.sub(rb"\r?\n", b"\r\n", text.encode()))
    dns = None
    if limit is not None:
        assert isinstance(f.resolver, DnsResolver)
        dns = LimitedResolver(f.resolver, limit)
    ctx = FilterContext(stage=Stage.MESSAGE, qid="0000000000000QID",
                        client=Client("192.0.2.1", 40000),
                        message=Message.from_spool(path, path.stat().st_size), dns=dns)
    return asyncio.run(f.on_message(ctx))


def body(*lines: str) -> str:
    return "From: a@sender.test\nSubject: t\n\n" + "\n".join(lines) + "\n"


def names(ns: DnsServer, zone: str) -> list[str]:
    return [n for n, _, _ in ns.queries if n.endswith("." + zone)]


@pytest.mark.parametrize(("host", "want"), [
    ("sub.domain.co.uk", ("domain.co.uk", "sub.domain.co.uk")),
    ("www.evil.test", ("evil.test", "www.evil.test")),
    ("evil.test", ("evil.test", "evil.test")),
    ("bücher.example", ("xn--bcher-kva.example", "xn--bcher-kva.example")),
    ("co.uk", None),  # a public suffix: nothing registered
    ("localhost", None),
    ("bad_host!.test", None),
])
def test_registered_domain(host: str, want: tuple[str, str] | None) -> None:
    assert registered(host) == want


def test_urls_in_text_and_html_parts(ns: DnsServer, tmp_path: Path) -> None:
    r = run(make(ns), tmp_path, TEXT_AND_HTML)
    assert set(r.symbols) == {
        Symbol("URIBL_TEST_BLACK", ("evil.test", "domain.co.uk")),
        Symbol("URIBL_TEST_GREY", ("htmlonly.test",)),  # only in the HTML part's href
        Symbol("SURBL_PH", ("phish.test",)), Symbol("SURBL_MW", ("phish.test",)),
        Symbol("SURBL_ABUSE", ("192.0.2.7",)),
    }
    assert r.data["listed"]["uribl.test"] == ["evil.test", "domain.co.uk", "htmlonly.test"]


def test_each_domain_is_asked_once_per_zone(ns: DnsServer, tmp_path: Path) -> None:
    before = len(ns.queries)
    r = run(make(ns), tmp_path, TEXT_AND_HTML)
    asked = [n for n, _, _ in ns.queries[before:]]
    # evil.test appears four times, as evil.test, WWW.Evil.Test and www.evil.test
    assert asked.count("evil.test.uribl.test") == 1
    assert "sub.domain.co.uk.uribl.test" not in asked and "domain.co.uk.uribl.test" in asked
    # the IP literal only where ips = true
    assert "7.2.0.192.multi.test" in asked and not any(n.startswith("7.2.0.192.uribl") for n in
                                                       asked)
    assert sorted(asked) == sorted(set(asked)) and len(asked) == r.data["lookups"] == 9


def test_unnamed_bit_gives_the_generic_symbol(ns: DnsServer, tmp_path: Path) -> None:
    r = run(make(ns, [SURBL]), tmp_path, body("http://odd.test/"))
    assert r.symbols == (Symbol("SURBL", ("odd.test=127.0.0.32",)),)


def test_refused_answer_is_not_a_listing(ns: DnsServer, tmp_path: Path) -> None:
    r = run(make(ns, [URIBL]), tmp_path, body("http://refused.test/"))
    assert r.symbols == (Symbol("URIBL_TEST_BLOCKED", ("127.0.0.1",)),)
    assert r.data["listed"] == {}


def test_full_host_is_asked_only_where_configured(ns: DnsServer, tmp_path: Path) -> None:
    full = {"zone": "full.test", "symbol": "FULL", "codes": {"127.0.0.2": "HOST"}}
    assert run(make(ns, [full]), tmp_path, body("http://bad.host.test/")).symbols == ()
    r = run(make(ns, [{**full, "full_host": True}]), tmp_path, body("http://bad.host.test/"))
    assert r.symbols == (Symbol("FULL_HOST", ("bad.host.test",)),)


def test_max_lookups_caps_the_queries_in_order(ns: DnsServer, tmp_path: Path) -> None:
    before = len(ns.queries)
    urls = [f"http://cap{i}.test/" for i in range(5)]
    r = run(make(ns, [URIBL], max_lookups=2), tmp_path, body(*urls))
    assert [n for n, _, _ in ns.queries[before:]] == ["cap0.test.uribl.test",
                                                      "cap1.test.uribl.test"]
    assert r.symbols == (Symbol("URIBL_MAX_LOOKUPS", ("3 not checked",)),)


def test_the_message_dns_limit_applies(ns: DnsServer, tmp_path: Path) -> None:
    before = len(ns.queries)
    r = run(make(ns, [URIBL]), tmp_path, body("http://lim0.test/ http://lim1.test/"), limit=1)
    assert len(ns.queries) - before == 1
    assert r.symbols == (Symbol("URIBL_TEST_TEMPERROR",
                                ("per-message DNS lookup limit (1) reached",)),)


def test_a_dropped_query_times_out_within_the_deadline(ns: DnsServer, tmp_path: Path) -> None:
    r = run(make(ns, [URIBL], dns_timeout_s=0.3), tmp_path,
            body("http://slow.test/ http://evil.test/"))
    assert set(r.symbols) == {Symbol("URIBL_TEST_TEMPERROR", ("timed out after 0.3s",)),
                              Symbol("URIBL_TEST_BLACK", ("evil.test",))}


def test_ignored_domains_and_no_urls(ns: DnsServer, tmp_path: Path) -> None:
    before = len(ns.queries)
    f = make(ns, ignore_domains=["evil.test", "co.uk"])
    assert run(f, tmp_path, body("http://www.evil.test/ http://x.domain.co.uk/")).symbols == ()
    assert run(f, tmp_path, body("no links here")).data["lookups"] == 0
    assert len(ns.queries) == before


@pytest.mark.parametrize(("cfg", "key"), [
    ({}, "zones"),
    ({"zones": [{"zone": "u.test", "symbol": "U", "ipv6": True}]}, "zones[0].ipv6"),
    ({"zones": [{"zone": "u.test", "symbol": "U", "full_host": "no"}]}, "zones[0].full_host"),
    ({"zones": [{"zone": "u.test", "symbol": "U"}], "ignore_domains": "x.test"},
     "ignore_domains"),
    ({"zones": [{"zone": "u.test", "symbol": "U"}], "ignore_domains": ["not a domain"]},
     "ignore_domains"),
    ({"zones": [{"zone": "u.test", "symbol": "U"}], "max_lookups": 1.5}, "max_lookups"),
])
def test_bad_settings_name_the_key(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        UriblFilter.from_config(cfg, Services())
    assert e.value.key == key
