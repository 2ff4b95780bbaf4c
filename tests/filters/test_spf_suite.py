"""The whole openspf RFC 7208 test suite (../shared/corpora/spf-openspf-testsuite) through the spf
filter: each scenario's zonedata is served by the loopback dnslib server, each test is one case
comparing the filter's result with the suite's (one result or a list of acceptable ones)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RR, TXT, A, DNSLabel, DNSRecord

import filters.spf
from filters.spf import SpfFilter
from gateway.dnsresolver import DnsResolver
from gateway.policy.schema import DnsConfig
from tests.support import tally
from tests.support.dnsserver import DnsServer

SUITE = (Path(__file__).resolve().parents[3] / "shared" / "corpora"
         / "spf-openspf-testsuite" / "rfc7208-tests.yml")
SCENARIOS: list[dict[str, Any]] = (
    list(yaml.safe_load_all(SUITE.read_bytes())) if SUITE.exists() else [])

# Tests that cannot pass here, with the reason (keyed by test id).
XFAIL: dict[str, str] = {}


class SuiteDnsServer(DnsServer):
    """DnsServer plus the suite's TIMEOUT marker: a query for a marked name goes unanswered
    unless its type has records listed before the marker."""

    def __init__(self, zonedata: dict[str, list[Any]]) -> None:
        super().__init__("")
        self.timeout_types: dict[str, set[str]] = {}
        for name, items in (zonedata or {}).items():
            key = str(DNSLabel(name)).lower().rstrip(".")  # as DnsServer keys (escaped)
            rrs, timeout_types = _records(name, items)
            self.records[key] = rrs
            if timeout_types is not None:
                self.timeout_types[key] = timeout_types

    def answer(self, data: bytes, proto: str) -> bytes | None:
        q = DNSRecord.parse(data).q
        name, qtype = str(q.qname).lower().rstrip("."), QTYPE[q.qtype]
        allowed = self.timeout_types.get(name)
        if allowed is not None and qtype not in allowed:
            self.queries.append((name, qtype, proto))
            return None
        return super().answer(data, proto)


def _octets(s: str) -> bytes:
    try:
        return s.encode("latin-1")  # the suite's "\xEF\xBB\xBF" escapes mean those bytes
    except UnicodeEncodeError:
        return s.encode("utf-8")


def _txt(value: Any) -> TXT:
    """A TXT rdata; long strings split at 255 octets. ``SPF: [ ]`` (zero strings) cannot go on
    the wire (dnspython refuses an empty TXT rdata as FORMERR), so it is one empty string."""
    parts = [value] if isinstance(value, str) else list(value) or [""]
    chunks: list[bytes] = []
    for p in parts:
        b = _octets(str(p))
        chunks += [b[i:i + 255] for i in range(0, len(b), 255)] or [b""]
    return TXT(chunks)


def _records(name: str, items: list[Any]) -> tuple[list[RR], set[str] | None]:
    """dnslib RRs for one zonedata name, and the types answered despite a TIMEOUT (or None)."""
    rrs: list[RR] = []
    timeout: set[str] | None = None
    has_txt = any(isinstance(i, dict) and "TXT" in i for i in items)
    for item in items:
        if item == "TIMEOUT":
            timeout = {QTYPE[rr.rtype] for rr in rrs}
            continue
        ((kind, value),) = item.items()
        rdata: Any
        if kind in ("TXT", "SPF"):
            if value == "NONE":
                continue
            rdata = _txt(value)
            if kind == "SPF" and not has_txt:
                rrs.append(RR(name, QTYPE.TXT, rdata=rdata, ttl=60))
        elif kind == "A":
            rdata = A(str(ipaddress.IPv4Address(value)))
        elif kind == "AAAA":
            rdata = AAAA(str(ipaddress.IPv6Address(value)))
        elif kind == "MX":
            rdata = MX(value[1] or ".", value[0])
        elif kind == "PTR":
            rdata = PTR(value)
        elif kind == "CNAME":
            rdata = CNAME(value)
        else:
            raise ValueError(f"{name}: unknown zonedata kind {kind}")
        rrs.append(RR(name, getattr(QTYPE, kind), rdata=rdata, ttl=60))
    return rrs, timeout


def _cases() -> Iterator[Any]:
    for index, scenario in enumerate(SCENARIOS):
        for test_id, test in scenario["tests"].items():
            marks = [pytest.mark.xfail(reason=XFAIL[test_id], strict=True)] \
                if test_id in XFAIL else []
            yield pytest.param(index, test_id, test, id=test_id, marks=marks)


SUITE_NAME = "SPF (openspf RFC 7208 suite)"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, SuiteDnsServer]]:
    started: dict[int, SuiteDnsServer] = {}
    yield started
    for s in started.values():
        s.stop()

@pytest.mark.skipif(not SCENARIOS, reason=f"SPF suite not found at {SUITE}")
@pytest.mark.parametrize("rounds", [filters.spf.INLINE_ROUNDS, 1])
@pytest.mark.parametrize("index,test_id,test", list(_cases()))
def test_rfc7208_suite(servers: dict[int, SuiteDnsServer], index: int, test_id: str,
                       test: dict[str, Any], rounds: int, monkeypatch: pytest.MonkeyPatch
                       ) -> None:
    """Each case replayed on the loop (the default), and with one replay before the worker
    thread takes over with the answers so far (INLINE_ROUNDS 1)."""
    monkeypatch.setattr(filters.spf, "INLINE_ROUNDS", rounds)
    server = servers.get(index)
    if server is None:
        server = servers[index] = SuiteDnsServer(SCENARIOS[index].get("zonedata") or {})
        server.start()
    resolver = DnsResolver(DnsConfig(nameservers=(("127.0.0.1", server.port),), timeout_s=0.3))
    f = SpfFilter(resolver, timeout_s=5.0, receiver="receiver.test")
    mailfrom = str(test.get("mailfrom") or "")
    helo = str(test.get("helo") or "")
    identity = "mailfrom" if mailfrom else "helo"
    domain = mailfrom.rpartition("@")[2] if mailfrom else helo
    result = asyncio.run(f.check(str(test["host"]), mailfrom, helo, identity, domain))
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    got = result.data["result"]
    if rounds != 1:  # the summary counts each case once
        tally.record(SUITE_NAME, got in expected)
    assert got in expected, (f"{test_id}: got {got} ({result.symbols[0].options}), "
                             f"expected {expected}: {test.get('description', '')}")
    assert result.symbols[0].name == f"SPF_{got.upper()}"
    want_exp = test.get("explanation")
    if got == "fail" and want_exp and want_exp != "DEFAULT":
        assert result.data["explanation"] == want_exp

