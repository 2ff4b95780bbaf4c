"""MX routing end to end: a gateway in queue mode with ``relay.transport = {"other.test" =
"mx:PORT"}`` and ``[dns] nameservers`` pointing at a real authoritative DNS server on loopback
(tests/support/dnsserver.py). The MX hosts resolve to 127.0.0.2 (preferred) and 127.0.0.1
(backup), each with an SMTP sink on the same port; DSNs for sender.test go to a third sink.

Checked: the preferred MX gets the mail; with it down, the backup does; one message to two
domains goes to each domain's own MX; null MX → DSN with Status 5.1.10; NXDOMAIN → DSN with
5.1.2; a DNS timeout → deferred (spool/deferred/QID.json, 4.4.3), no DSN. No traffic leaves
loopback: the gateway's resolver is configured with the test server only (its log says so), and
that server sees the queries.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Message, Sink

ZONE = """
other.test.                60 IN MX 10 mx1.other.test.
other.test.                60 IN MX 20 mx2.other.test.
mx1.other.test.            60 IN A 127.0.0.2
mx2.other.test.            60 IN A 127.0.0.1
backup.other.test.         60 IN MX 10 mx1.backup.other.test.
backup.other.test.         60 IN MX 20 mx2.other.test.
mx1.backup.other.test.     60 IN A 127.0.0.3
null.other.test.           60 IN MX 0 .
"""
SENDER = "bob@sender.test"
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-Za-z]{16})")


@dataclass
class World:
    gw: GatewayProcess
    ns: DnsServer
    preferred: Sink  # 127.0.0.2:port, mx1.other.test
    backup: Sink  # 127.0.0.1:port, mx2.other.test
    dsn: Sink  # the downstream for everything else (the sender's domain: DSNs)

    @property
    def spool(self) -> Path:
        return self.gw.workdir / "spool"


@pytest.fixture
def world(gateway_factory: Callable[..., GatewayProcess]) -> Iterator[World]:
    with DnsServer(ZONE, drop=["slow.other.test"]) as ns, Sink(host="127.0.0.2") as preferred, \
            Sink(host="127.0.0.1", port=preferred.port) as backup, Sink() as dsn:
        mx = f"mx:{preferred.port}"
        gw = gateway_factory(base_policy(
            f"smtp://127.0.0.1:{dsn.port}",
            relay={"mode": "queue", "transport": {"other.test": mx, ".other.test": mx}},
            domains={"trusted_networks": ["127.0.0.0/8"]},
            dns={"nameservers": [f"127.0.0.1:{ns.port}"], "timeout_s": 0.5},
            queue={"scan_interval_s": 0.2, "min_backoff_s": 60, "max_backoff_s": 60}))
        yield World(gw, ns, preferred, backup, dsn)


def send(gw: GatewayProcess, rcpts: list[str], tag: str, rcpt_options: tuple[str, ...] = ()
         ) -> str:
    body = (f"From: <{SENDER}>\r\nTo: <{rcpts[0]}>\r\nSubject: {tag}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n"
            f"X-Test-Id: {tag}\r\n\r\nhello {tag}\r\n").encode()
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER)[0] == 250
        for r in rcpts:
            code, msg = s.rcpt(r, list(rcpt_options))
            assert code == 250, (r, code, msg)
        code, msg = s.data(body)
    m = QUEUED_RE.search(msg.decode())
    assert code == 250 and m, (code, msg)
    return m.group(1)


def delivery(gw: GatewayProcess, qid: str, outcome: str) -> dict[str, Any]:
    return gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid
                       and e.get("outcome") == outcome, 10)


def tagged(messages: list[Message], tag: str) -> list[Message]:
    return [m for m in messages if f"X-Test-Id: {tag}\r\n".encode()
            in m.data.partition(b"\r\n\r\n")[0] + b"\r\n"]


def dsn_fields(msg: Message) -> dict[str, str]:
    """The per-recipient fields of the DSN's message/delivery-status part."""
    part = msg.data.split(b"Content-Type: message/delivery-status", 1)[1]
    fields = re.findall(rb"^(Final-Recipient|Action|Status|Diagnostic-Code): (.*?)\r$",
                        part, re.M)
    return {k.decode(): v.decode() for k, v in fields}


def assert_resolver_is_the_test_server(w: World) -> None:
    ev = w.gw.wait_for(lambda e: e.get("event") == "dns_resolver")
    assert ev["source"] == "policy"  # not /etc/resolv.conf
    assert ev["nameservers"] == [f"127.0.0.1:{w.ns.port}"]


# -- delivery to the MX hosts -------------------------------------------------------------------

def test_mail_goes_to_the_preferred_mx(world: World):
    qid = send(world.gw, ["alice@other.test"], "preferred")
    [msg] = tagged(world.preferred.wait_for(1), "preferred")
    assert msg.rcpts == ("alice@other.test",) and msg.mail_from == SENDER
    ev = delivery(world.gw, qid, "done")
    assert ev["rcpts"]["alice@other.test"].startswith("delivered: 250")
    assert world.backup.messages == [] and world.backup.connections == 0
    assert ("other.test", "MX", "udp") in world.ns.queries
    assert ("mx1.other.test", "A", "udp") in world.ns.queries
    assert_resolver_is_the_test_server(world)


def test_success_dsn_names_the_mx_host_that_took_it(world: World):
    """NOTIFY=SUCCESS to an MX host without DSN: the 'relayed' report's Remote-MTA is the MX
    host's name (RFC 3461 6.3 e), not the address we connected to."""
    qid = send(world.gw, ["alice@other.test"], "notify", ("NOTIFY=SUCCESS",))
    tagged(world.preferred.wait_for(1, 15), "notify")
    [report] = [m for m in world.dsn.wait_for(1, 15) if m.mail_from == ""]
    assert report.rcpts == (SENDER,) and f"X-Mailgate-Queue-ID: {qid}".encode() in report.data
    part = report.data.split(b"Content-Type: message/delivery-status", 1)[1]
    assert re.search(rb"^Action: relayed\r$", part, re.M), part
    assert re.search(rb"^Remote-MTA: dns; mx1\.other\.test\r$", part, re.M), part


def test_preferred_mx_down_the_backup_gets_the_mail(world: World):
    qid = send(world.gw, ["carol@backup.other.test"], "backup")  # mx1 (127.0.0.3) is down
    [msg] = tagged(world.backup.wait_for(1), "backup")
    assert msg.rcpts == ("carol@backup.other.test",)
    assert delivery(world.gw, qid, "done")["rcpts"]["carol@backup.other.test"].startswith(
        "delivered: 250")
    assert world.preferred.messages == []
    tried = [line for line in world.gw.lines()
             if "mx1.backup.other.test[127.0.0.3]" in line and "trying the next" in line]
    assert tried, "the preferred MX was not tried first"


def test_one_message_to_two_domains_goes_to_each_domains_own_mx(world: World):
    qid = send(world.gw, ["alice@other.test", "carol@backup.other.test"], "split")
    [a] = tagged(world.preferred.wait_for(1), "split")
    [b] = tagged(world.backup.wait_for(1), "split")
    assert a.rcpts == ("alice@other.test",) and b.rcpts == ("carol@backup.other.test",)
    ev = delivery(world.gw, qid, "done")
    assert all(v.startswith("delivered: 250") for v in ev["rcpts"].values()), ev["rcpts"]


# -- DNS failures: permanent → DSN, temporary → deferred ----------------------------------------

@pytest.mark.parametrize("rcpt,code,status", [
    ("dave@null.other.test", 556, "5.1.10"),  # RFC 7505 null MX
    ("erin@gone.other.test", 550, "5.1.2"),  # NXDOMAIN
])
def test_permanent_dns_answers_bounce_with_a_dsn(world: World, rcpt, code, status):
    qid = send(world.gw, [rcpt], "bounce")
    ev = delivery(world.gw, qid, "done")
    assert ev["rcpts"][rcpt].startswith(f"failed: {code} {status} ")
    [bounce] = world.dsn.wait_for(1)
    assert bounce.mail_from == "" and bounce.rcpts == (SENDER,)
    fields = dsn_fields(bounce)
    assert fields["Final-Recipient"] == f"rfc822; {rcpt}"
    assert fields["Action"] == "failed" and fields["Status"] == status
    assert fields["Diagnostic-Code"].startswith(f"smtp; {code} {status} ")
    assert world.preferred.connections == world.backup.connections == 0
    assert not (world.spool / "deferred" / f"{qid}.json").exists()
    assert_resolver_is_the_test_server(world)


def test_dns_timeout_defers_the_message(world: World):
    t0 = time.monotonic()
    qid = send(world.gw, ["frank@slow.other.test"], "slow")
    ev = delivery(world.gw, qid, "deferred")
    assert time.monotonic() - t0 < 5  # the query gave up within dns.timeout_s (0.5 s)
    assert ev["rcpts"]["frank@slow.other.test"].startswith("pending: 451 4.4.3 ")
    meta = json.loads((world.spool / "deferred" / f"{qid}.json").read_bytes())
    [r] = meta["recipients"]
    assert r["addr"] == "frank@slow.other.test" and r["state"] == "pending"
    assert "4.4.3" in r["last_reply"] and "timed out" in r["last_reply"]
    assert ("slow.other.test", "MX", "udp") in world.ns.queries
    assert world.gw.events("dsn") == [] and world.dsn.messages == []
