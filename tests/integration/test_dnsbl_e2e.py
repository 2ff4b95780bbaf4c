"""DNSBL and URIBL end to end: the real gateway with ``[dns] nameservers`` pointing at the
loopback test DNS server, which lists the test client (127.0.0.1, so ``skip_private = false``)
in rbl.test and evil.test in uribl.test. A connect-stage rule on the DNSBL symbol refuses in
place of the greeting; without it, the connect-stage symbol and the URIBL hit are scored at end
of data and appear in the message log line."""

from __future__ import annotations

import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

ZONE = """\
1.0.0.127.rbl.test. 60 IN A 127.0.0.2
evil.test.uribl.test. 60 IN A 127.0.0.2
"""
DNSBL = {"name": "dnsbl", "skip_private": False, "timeout_s": 5, "dns_timeout_s": 2,
         "zones": [{"zone": "rbl.test", "symbol": "RBL_TEST", "codes": {"127.0.0.2": "SBL"}}]}
URIBL = {"name": "uribl", "dns_timeout_s": 2,
         "zones": [{"zone": "uribl.test", "symbol": "URIBL_TEST", "codes": {"127.0.0.2": "BLACK"}}]}
RCPT = {"name": "rcpt", "recipients": ["@example.test"]}


@pytest.fixture(scope="module")
def ns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def policy(ns: DnsServer, downstream: str = "maildir:Maildir", **sections: Any) -> dict[str, Any]:
    return base_policy(downstream, dns={"nameservers": [f"127.0.0.1:{ns.port}"], "timeout_s": 2}, **sections)


def test_connect_stage_dnsbl_rule_refuses_in_place_of_the_greeting(
        ns: DnsServer, tmp_path: Path) -> None:
    p = policy(ns, filters=[RCPT, DNSBL], rules=[
        {"name": "rbl", "if_any": ["RBL_TEST_SBL"], "stage": "connect", "action": "reject",
         "reply": "554 5.7.1 Listed at rbl.test"}])
    with GatewayProcess(tmp_path / "gw", p) as gw, \
            socket.create_connection(gw.address, timeout=10) as s:
        f = s.makefile("rb")
        first = f.readline().decode().rstrip("\r\n")
        assert re.fullmatch(r"554 5\.7\.1 Listed at rbl\.test \(S[0-9A-Z]{15}\)", first), first
        s.sendall(b"EHLO client.test\r\nQUIT\r\n")
        assert [f.readline() for _ in range(2)] == [
            b"503 5.5.1 Service refused, only QUIT is accepted\r\n", b"221 2.0.0 Bye\r\n"]
        ev = gw.wait_for(lambda e: e.get("event") == "refused")
        assert ev["stage"] == "connect" and ev["by"] == "rule:rbl"
    assert ("1.0.0.127.rbl.test", "A", "udp") in ns.queries


def test_uribl_hit_is_scored_at_end_of_data(ns: DnsServer, tmp_path: Path) -> None:
    with Sink() as sink:
        p = policy(ns, downstream=f"smtp://127.0.0.1:{sink.port}",
                   filters=[RCPT, DNSBL, URIBL],
                   scores={"RBL_TEST_SBL": 2.0, "URIBL_TEST_BLACK": 4.0})
        with GatewayProcess(tmp_path / "gw", p) as gw:
            with smtplib.SMTP(*gw.address, timeout=20) as s:
                s.ehlo("client.test")
                qids = []
                for link in ("http://www.evil.test/offer", "http://good.test/"):
                    assert s.mail("a@sender.test")[0] == 250
                    assert s.rcpt("alice@example.test")[0] == 250
                    code, text = s.data(f"From: a@sender.test\r\nSubject: hi\r\n\r\n"
                                        f"Visit {link} now\r\n".encode())
                    assert code == 250, text
                    qids.append(text.decode().rsplit(" ", 1)[1])
            listed, clean = (gw.message_event(q) for q in qids)
            assert listed["action"] == "add_header" and listed["score"] == 6
            assert "URIBL_TEST_BLACK(4)[evil.test]" in listed["symbols"]
            assert "RBL_TEST_SBL(2)[127.0.0.1]" in listed["symbols"]  # from the connect stage
            assert clean["action"] == "accept" and clean["score"] == 2
            assert not any(sym.startswith("URIBL") for sym in clean["symbols"])
            first, second = (m.data for m in sink.wait_for(2, timeout_s=10))
            assert b"X-Spam-Status: Yes" in first and b"X-Spam-Status: No" in second
