"""SPF, DKIM, DMARC and Authentication-Results end to end: the real gateway (proxy relay to the
sink) with ``[dns] nameservers`` pointing at the loopback test DNS server, which serves the
dkimpy corpus key (``test._domainkey.football.example.com``), an SPF record allowing 127.0.0.1
for football.example.com, and DMARC records (p=reject) for football.example.com and reject.test.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import authres
import authres.dmarc
import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")

AUTHSERV = "mx.gateway.test"  # base_policy's server.hostname: the default authserv-id
SENDER = "joe@football.example.com"
RCPT = "alice@example.test"
PARSER = authres.FeatureContext(authres.dmarc)


def txt(name: str, value: str) -> str:
    chunks = " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))
    return f"{name}. 60 IN TXT {chunks}\n"


def zone() -> str:
    return "".join([
        txt("test._domainkey.football.example.com", (DATA / "test.txt").read_text().strip()),
        txt("football.example.com", "v=spf1 ip4:127.0.0.1 -all"),
        txt("_dmarc.football.example.com", "v=DMARC1; p=reject"),
        txt("reject.test", "v=spf1 -all"),
        txt("_dmarc.reject.test", "v=DMARC1; p=reject"),
    ])


def signed() -> bytes:
    """The corpus message signed by d=football.example.com s=test (rsa-sha256, simple)."""
    return re.sub(rb"\r?\n", b"\r\n", (DATA / "rfc6376.signed.rsa.msg").read_bytes())


class World:
    def __init__(self, ns: DnsServer, sink: Sink, gw: GatewayProcess) -> None:
        self.ns, self.sink, self.gw = ns, sink, gw

    def send(self, data: bytes, sender: str = SENDER) -> tuple[int, bytes]:
        """Send one message; the end-of-DATA reply."""
        with smtplib.SMTP(*self.gw.address, timeout=20) as s:
            s.ehlo("client.football.example.com")
            code, _ = s.mail(sender)
            assert code == 250
            code, _ = s.rcpt(RCPT)
            assert code == 250
            return s.data(data)

    def delivered(self, n: int) -> bytes:
        return self.sink.wait_for(n, timeout_s=10)[n - 1].data


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with DnsServer(zone()) as ns, Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            dns={"nameservers": [f"127.0.0.1:{ns.port}"], "timeout_s": 2},
            filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                     {"name": "spf"}, {"name": "dkim"}, {"name": "dmarc"},
                     {"name": "authres"}])
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield World(ns, sink, gw)


def our_results(data: bytes) -> tuple[list[str], Any]:
    """All Authentication-Results values of a delivered message, and ours parsed."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    values = [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n")
              if line.lower().startswith("authentication-results:")]
    ours = [PARSER.parse_value(v) for v in values if v.split(";")[0].strip() == AUTHSERV]
    assert len(ours) == 1, values
    return values, ours[0]


def by_method(header: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for r in header.results:
        out.setdefault(r.method, []).append(r)
    return out


def test_signed_message_passes_and_forged_header_is_removed(world: World) -> None:
    forged = (f"Authentication-Results: {AUTHSERV.upper()}; dkim=pass header.d=forged.example\r\n"
              "Authentication-Results: lists.example.org; spf=pass smtp.mailfrom=x@y.example\r\n")
    n = len(world.sink.messages) + 1
    code, reply = world.send(forged.encode() + signed())
    assert code == 250, reply
    data = world.delivered(n)
    values, ours = our_results(data)
    assert "forged.example" not in data.decode()
    assert any(v.startswith("lists.example.org;") for v in values)  # foreign authserv-id stays
    res = by_method(ours)
    assert [(r.result, r.smtp_mailfrom) for r in res["spf"]] == [("pass", SENDER)]
    assert [(r.result, r.header_d, r.header_s, r.header_a) for r in res["dkim"]] == \
        [("pass", "football.example.com", "test", "rsa-sha256")]
    assert [(r.result, r.header_from, r.policy) for r in res["dmarc"]] == \
        [("pass", "football.example.com", "reject")]


def test_modified_body_fails_dkim(world: World) -> None:
    n = len(world.sink.messages) + 1
    code, reply = world.send(signed().replace(b"We lost the game.", b"We won the game."))
    assert code == 250, reply
    _, ours = our_results(world.delivered(n))
    res = by_method(ours)
    assert [(r.result, r.header_d, r.header_s) for r in res["dkim"]] == \
        [("fail", "football.example.com", "test")]
    assert res["spf"][0].result == "pass"
    assert res["dmarc"][0].result == "pass"  # SPF is aligned with the From domain


def test_dmarc_reject_refuses_at_end_of_data(world: World) -> None:
    before = len(world.sink.messages)
    data = signed().replace(b"From: Joe SixPack <joe@football.example.com>",
                            b"From: Joe SixPack <joe@reject.test>")
    assert data != signed()
    code, reply = world.send(data)
    assert code == 550 and reply.startswith(b"5.7.1"), (code, reply)
    with pytest.raises(AssertionError):  # the sink's wait_for times out: nothing relayed
        world.sink.wait_for(before + 1, timeout_s=1)
    assert len(world.sink.messages) == before
