"""A dead nameserver fails fast (gateway/dnsfailfast.py through gateway/dnsresolver.py), against
real servers on loopback: a closed UDP port (tests/support/dnsserver.py's ``closed_udp_port``:
the kernel answers ICMP port unreachable) for "down", the test DNS server for "up".

* a refusing server gives ``temperror`` at once, not after ``timeout_s`` (5 s here);
* with a refusing server first, the next one is asked at once;
* after a refusal the server is held down for ``down_hold_s``: lookups meanwhile are not sent
  (counted), then it is asked again; ``dns_server_down`` / ``dns_server_up`` logged once each;
* a server that never answers is not "refusing": it still costs the timeout, and is not held.

Before this change (unconnected UDP sockets) every lookup against the closed port waited out
its whole ``timeout_s`` (5.0-5.5 s), and a refusing first server cost ``PER_SERVER_S`` (2 s)
before the second was asked."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from gateway.dnsresolver import DnsAnswer, DnsResolver
from gateway.logs import EVENT_ATTR
from gateway.policy.schema import DnsConfig
from tests.support.dnsserver import DnsServer, closed_udp_port, silent_udp_port

ZONE = """
a.test.   300 IN A 127.0.0.3
b.test.   300 IN A 127.0.0.4
"""
TIMEOUT_S = 5.0  # [dns] timeout_s: what a lookup against a dead server used to cost
FAST_S = 0.5  # "at once", generously: a loaded 2-core box, still 10x below TIMEOUT_S


def make(*servers: tuple[str, int], timeout_s: float = TIMEOUT_S, **kw: Any) -> DnsResolver:
    return DnsResolver(DnsConfig(nameservers=servers, timeout_s=timeout_s), **kw)


def timed(r: DnsResolver, name: str, rdtype: str = "A") -> tuple[DnsAnswer, float]:
    async def go() -> tuple[DnsAnswer, float]:
        t0 = time.monotonic()
        answer = await r.query(name, rdtype)
        return answer, time.monotonic() - t0
    return asyncio.run(go())


def test_a_refusing_nameserver_is_a_temperror_at_once() -> None:
    port = closed_udp_port()
    r = make(("127.0.0.1", port))
    timed(r, "warm.test")  # dnspython's first import is not the lookup's cost
    answer, took = timed(r, "a.test")
    assert took < FAST_S, f"{took:.2f}s: waited for the timeout instead of the refusal"
    assert answer.status == "temperror"
    first, _ = timed(make(("127.0.0.1", port)), "a.test")
    assert first.error == f"no nameserver reachable: 127.0.0.1:{port} connection refused"
    assert answer.error == f"no nameserver reachable: 127.0.0.1:{port} held down after a refusal"
    assert (r.refusals, r.skipped_down, r.upstream_queries) == (1, 1, 2)


def test_a_refusing_ipv6_nameserver_is_a_temperror_at_once() -> None:
    port = closed_udp_port("::1")
    r = make(("::1", port))
    timed(r, "warm.test")
    answer, took = timed(make(("::1", port)), "a.test")
    assert took < FAST_S, f"{took:.2f}s"
    assert answer.error == f"no nameserver reachable: [::1]:{port} connection refused"


def test_with_the_first_nameserver_refusing_the_next_is_asked_at_once() -> None:
    with DnsServer(ZONE) as ns:
        r = make(("127.0.0.1", closed_udp_port()), ("127.0.0.1", ns.port))
        timed(r, "warm.test")
        answer, took = timed(r, "a.test")
        assert took < FAST_S, f"{took:.2f}s: the refusing first server was waited for"
        assert answer.ok and [x.to_text() for x in answer.records] == ["127.0.0.3"]
        answer, took = timed(r, "b.test")
        assert took < FAST_S and answer.ok
        assert [q for q in ns.queries if q[0] != "warm.test"] == [("a.test", "A", "udp"),
                                                                  ("b.test", "A", "udp")]
        # the refusing server was asked once; held down since, it was skipped
        assert r.refusals == 1 and r.skipped_down == 2


def test_all_nameservers_refusing_is_a_temperror_at_once() -> None:
    p1, p2 = closed_udp_port(), closed_udp_port()
    r = make(("127.0.0.1", p1), ("127.0.0.1", p2))
    timed(r, "warm.test")
    r = make(("127.0.0.1", p1), ("127.0.0.1", p2))
    answer, took = timed(r, "a.test")
    assert took < FAST_S, f"{took:.2f}s"
    assert answer.status == "temperror"
    assert answer.error == (f"no nameserver reachable: 127.0.0.1:{p1} connection refused; "
                            f"127.0.0.1:{p2} connection refused")
    assert r.refusals == 2


def test_a_refusing_server_is_held_down_not_hammered_then_asked_again(
        caplog: pytest.LogCaptureFixture) -> None:
    hold_s = 2.0  # 21 lookups take milliseconds; 2 s leaves room for a loaded box
    port = closed_udp_port()
    r = make(("127.0.0.1", port), down_hold_s=hold_s)
    caplog.set_level(logging.INFO, logger="mailgate.dns")
    t0 = time.monotonic()
    assert timed(r, "a.test")[0].error.endswith("connection refused")
    # the server comes back on that port; within the hold it is not asked at all
    with DnsServer(ZONE, port=port) as ns:
        answers = [timed(r, f"n{i}.a.test")[0] for i in range(20)]
        assert time.monotonic() - t0 < hold_s
        assert {a.error for a in answers} == {
            f"no nameserver reachable: 127.0.0.1:{port} held down after a refusal"}
        assert ns.queries == []
        assert (r.refusals, r.skipped_down) == (1, 20)
        time.sleep(max(0.0, t0 + hold_s + 0.1 - time.monotonic()))
        answer, _ = timed(r, "a.test")
        assert answer.ok, answer
        assert ns.queries[-1] == ("a.test", "A", "udp")
    events = [(rec.getMessage(), getattr(rec, EVENT_ATTR)) for rec in caplog.records
              if rec.getMessage().startswith("dns_server")]
    assert events == [
        ("dns_server_down", {"server": f"127.0.0.1:{port}", "error": "Connection refused",
                             "hold_s": hold_s}),
        ("dns_server_up", {"server": f"127.0.0.1:{port}"})]


def test_a_silent_nameserver_still_costs_the_timeout_and_is_not_held_down() -> None:
    silent = silent_udp_port()
    try:
        r = make(("127.0.0.1", silent.getsockname()[1]), timeout_s=0.3)
        for name in ("a.test", "b.test"):
            answer, took = timed(r, name)
            assert answer.status == "temperror" and took >= 0.29
            assert answer.error == "timed out after 0.3s"
        assert (r.refusals, r.skipped_down) == (0, 0)
    finally:
        silent.close()


def test_resolv_conf_servers_fail_fast_too_and_other_transports_are_kept() -> None:
    """``[dns] nameservers = []`` reads resolv.conf: its plain servers get the same treatment."""
    import dns.nameserver

    from gateway.dnsfailfast import FailFastNameserver, Health, fail_fast

    health = Health()
    doh = dns.nameserver.DoHNameserver("https://dns.example.test/dns-query")
    out = fail_fast([dns.nameserver.Do53Nameserver("192.0.2.53", 53),
                     dns.nameserver.Do53Nameserver("2001:db8::53", 5353), doh], health)
    assert [type(ns) for ns in out[:2]] == [FailFastNameserver, FailFastNameserver]
    assert [str(ns) for ns in out[:2]] == ["192.0.2.53:53", "[2001:db8::53]:5353"]
    assert all(ns.health is health for ns in out[:2])  # type: ignore[attr-defined]
    assert out[2] is doh


def test_a_server_refusing_tcp_only_is_still_asked_over_udp() -> None:
    """A server that answers UDP but refuses TCP (TCP/53 firewalled): the lookup whose UDP
    answer was truncated is a temperror at once (its TCP retry refused), and the next lookups
    are still sent over UDP and answered. The old hold-down took the TCP refusal for the
    whole server: every lookup in the next ``down_hold_s`` was a temperror without asking
    (and ``dns_server_down`` was logged for a server that answers)."""
    big = "".join(f'big.test. 300 IN TXT "{"x" * 200}{i}"\n' for i in range(6))  # > 512 bytes
    with DnsServer(ZONE + big, tcp=False) as ns:
        r = make(("127.0.0.1", ns.port), down_hold_s=30.0)
        answer, took = timed(r, "big.test", "TXT")
        assert answer.status == "temperror" and took < FAST_S, (answer, took)
        answers = [timed(r, name)[0] for name in ("a.test", "b.test")]
        assert [a.status for a in answers] == ["ok", "ok"], answers  # old: held down
        assert ns.queries == [("big.test", "TXT", "udp"), ("a.test", "A", "udp"),
                              ("b.test", "A", "udp")]
        assert (r.refusals, r.skipped_down) == (1, 0)
        # the TCP side alone is held down: the next truncated answer is not retried over TCP
        answer, _ = timed(r, "big.test", "TXT")
        assert answer.status == "temperror" and r.skipped_down == 1


def test_servers_read_from_resolv_conf_fail_fast(tmp_path, monkeypatch) -> None:
    """``[dns] nameservers = []``: the servers come from resolv.conf, which dnspython keeps as
    address strings, not ``Do53Nameserver`` objects. They must fail fast as well: the old
    code wrapped only the objects, so with resolv.conf's server refusing every lookup waited
    its whole ``timeout_s`` (15 s per message with the default chain, measured in a private
    network namespace). Here dnspython reads a resolv.conf file of the test's, and its
    ``port`` (which resolv.conf cannot set) is a closed port on loopback."""
    import dns.asyncresolver

    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\n")
    port = closed_udp_port()

    class FromTestFile(dns.asyncresolver.Resolver):
        def __init__(self, filename: str = "/etc/resolv.conf", configure: bool = True) -> None:
            super().__init__(filename=str(conf) if configure else filename,
                             configure=configure)
            self.port = port

    monkeypatch.setattr(dns.asyncresolver, "Resolver", FromTestFile)
    r = make(timeout_s=2.0)
    assert r.nameservers == (f"127.0.0.1:{port}",)
    answer, took = timed(r, "a.test")
    assert answer.status == "temperror" and took < FAST_S, (answer, took)  # old: 2 s
    assert answer.error == f"no nameserver reachable: 127.0.0.1:{port} connection refused"
    assert r.refusals == 1


def test_the_dnspython_check_passes_and_its_failure_keeps_dnspythons_own_servers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered in gateway/patches.py: the check passes on the pinned dnspython; when it
    fails (a changed dnspython), the resolver keeps plain Do53 servers (the library's path)."""
    import dns.nameserver

    import gateway.dnsfailfast as ff
    assert ff.check_connected_udp() is None and ff.FAIL_FAST
    monkeypatch.setattr(ff, "FAIL_FAST", False)
    r = make(("127.0.0.1", closed_udp_port()))
    resolver = r._get()
    assert resolver is not None
    assert [type(ns) for ns in resolver.nameservers] == [dns.nameserver.Do53Nameserver]
