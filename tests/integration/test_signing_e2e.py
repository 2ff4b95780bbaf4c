"""DKIM signing and ARC sealing end to end: the real gateway (proxy relay to the sink), DNS from
the loopback test server, keys from the dkimpy corpus. What the downstream receives is checked
with independent verifiers: dkimpy's own ``dkim.verify`` for DKIM, and the arc filter's chain
validation (whose ValiMail results are in test_arc_suite) for ARC.

Chain under test: spf, dkim, arc (seal d=gateway.test s=seal), dmarc, authres, dkim_sign
(example.test with an RSA key, ed.test with an Ed25519 key; only trusted clients: 127.0.0.1)."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest

from filters.arc import ArcFilter, Sealer, seal
from gateway.dnsresolver import DnsResolver
from gateway.edits import raw_field
from gateway.policy.schema import DnsConfig
from tests.integration.test_auth_e2e import AUTHSERV, by_method, our_results, signed, txt
from tests.support.dnsserver import DnsServer
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

DATA = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dkim-dkimpy" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")
RCPT = "alice@example.test"


def zone() -> str:
    return "".join([
        txt("test._domainkey.football.example.com", (DATA / "test.txt").read_text().strip()),
        txt("football.example.com", "v=spf1 ip4:127.0.0.1 -all"),
        txt("_dmarc.football.example.com", "v=DMARC1; p=reject"),
        txt("seal._domainkey.gateway.test", (DATA / "test.txt").read_text().strip()),
        txt("out._domainkey.example.test", (DATA / "test2.txt").read_text().strip()),
        txt("list._domainkey.lists.example.org", (DATA / "test2.txt").read_text().strip()),
        txt("list._domainkey.untrusted.example", (DATA / "test2.txt").read_text().strip()),
        txt("lists.example.org", "v=spf1 ip4:127.0.0.1 -all"),
        txt("untrusted.example", "v=spf1 ip4:127.0.0.1 -all"),
        txt("ed._domainkey.ed.test", "v=DKIM1; " + (DATA / "ed25519test.dns").read_text()
            .strip()),
    ])


class World:
    def __init__(self, ns: DnsServer, sink: Sink, gw: GatewayProcess) -> None:
        self.ns, self.sink, self.gw = ns, sink, gw

    def send(self, data: bytes, sender: str, source: str = "127.0.0.1") -> bytes:
        """Send one message from ``source``; what the downstream received."""
        n = len(self.sink.messages) + 1
        with smtplib.SMTP(*self.gw.address, timeout=20, source_address=(source, 0)) as s:
            s.ehlo("client.example.net")
            s.mail(sender)
            s.rcpt(RCPT)
            code, reply = s.data(data)
            assert code == 250, reply
        return self.sink.wait_for(n, timeout_s=10)[n - 1].data

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        """TXT records of the test zone, for dkimpy's own verifier."""
        key = name.decode().lower().rstrip(".")
        rrs = self.ns.records.get(key, [])
        return b"".join(rrs[0].rdata.data) if rrs else None

    def arc(self, data: bytes) -> tuple[str, str, int]:
        resolver = DnsResolver(DnsConfig(nameservers=(("127.0.0.1", self.ns.port),),
                                         timeout_s=2))
        chain = asyncio.run(ArcFilter(resolver).validate(data))
        return chain.result, chain.reason, len(chain.sets)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    keys = tmp_path_factory.mktemp("keys")
    (keys / "seal.pem").write_bytes((DATA / "test.private").read_bytes())
    (keys / "out.pem").write_bytes((DATA / "test2.private").read_bytes())
    (keys / "ed.key").write_bytes((DATA / "ed25519test.key").read_bytes())
    with DnsServer(zone()) as ns, Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            domains={"accepted": ["example.test"], "trusted_networks": ["127.0.0.1/32"]},
            dns={"nameservers": [f"127.0.0.1:{ns.port}"], "timeout_s": 2},
            filters=[
                {"name": "rcpt", "recipients": ["@example.test"]},
                {"name": "spf", "received_spf": True}, {"name": "dkim"},
                {"name": "arc", "seal_domain": "gateway.test", "seal_selector": "seal",
                 "seal_key_file": str(keys / "seal.pem")},
                {"name": "dmarc", "trusted_arc_sealers": ["example.org"]},
                {"name": "authres"},
                {"name": "dkim_sign", "domains": {
                    "example.test": {"selector": "out", "key_file": str(keys / "out.pem")},
                    "ed.test": {"selector": "ed", "key_file": str(keys / "ed.key")}}},
            ])
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield World(ns, sink, gw)


def headers_named(data: bytes, name: str) -> list[str]:
    head = re.sub(rb"\r\n[ \t]+", b" ", data.split(b"\r\n\r\n", 1)[0]).decode()
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def test_relayed_mail_is_arc_sealed_after_our_authentication_results(world: World) -> None:
    data = world.send(signed(), "joe@football.example.com")
    seal, = headers_named(data, "ARC-Seal")
    assert re.search(r"\bi=1;", seal) and "cv=none" in seal and "d=gateway.test" in seal
    aar, = headers_named(data, "ARC-Authentication-Results")
    assert aar.startswith(f"i=1; {AUTHSERV};")
    for method in ("spf=pass", "dkim=pass", "dmarc=pass", "arc=none"):
        assert method in aar, aar
    _, ours = our_results(data)
    assert [r.result for r in by_method(ours)["arc"]] == ["none"]
    assert world.arc(data) == ("pass", "", 1)
    # the seal sits on top, above our Received:
    assert data.startswith(b"ARC-Seal:"), data[:80]
    [received_spf] = headers_named(data, "Received-SPF")  # the spf filter's optional header
    assert received_spf.startswith("Pass (mx.gateway.test: domain of football.example.com "
                                   "designates 127.0.0.1 as permitted sender)"), received_spf
    # and the original DKIM signature still verifies after our edits
    assert dkim.verify(data, dnsfunc=world.dnsfunc)


def test_second_hop_validates_the_chain_and_adds_a_set(world: World) -> None:
    first = world.send(signed(), "joe@football.example.com")
    second = world.send(first, "joe@football.example.com")
    seals = headers_named(second, "ARC-Seal")
    assert len(seals) == 2
    newest = next(s for s in seals if re.search(r"\bi=2;", s))
    assert "cv=pass" in newest
    _, ours = our_results(second)  # the first hop's A-R (our authserv-id) was removed
    assert [r.result for r in by_method(ours)["arc"]] == ["pass"]
    assert world.arc(second) == ("pass", "", 2)


def test_broken_chain_is_reported_and_sealed_as_fail(world: World) -> None:
    first = world.send(signed(), "joe@football.example.com")
    tampered = first.replace(b"We lost the game.", b"We won the game.")
    assert tampered != first
    second = world.send(tampered, "joe@football.example.com")
    _, ours = our_results(second)
    assert [r.result for r in by_method(ours)["arc"]] == ["fail"]
    newest = next(s for s in headers_named(second, "ARC-Seal") if re.search(r"\bi=2;", s))
    assert "cv=fail" in newest
    assert world.arc(second)[0] == "fail"


MESSAGE = ("From: Ops <ops@{domain}>\r\nTo: <alice@example.test>\r\nSubject: report\r\n"
           "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <r1@{domain}>\r\n\r\n"
           "All systems nominal.\r\n")


@pytest.mark.parametrize("domain,selector,algorithm", [
    ("example.test", "out", "rsa-sha256"), ("ed.test", "ed", "ed25519-sha256"),
    ("news.example.test", "out", "rsa-sha256")])
def test_mail_from_our_domains_is_dkim_signed(world: World, domain: str, selector: str,
                                              algorithm: str) -> None:
    data = world.send(MESSAGE.format(domain=domain).encode(), f"ops@{domain}")
    sigs = [s for s in headers_named(data, "DKIM-Signature")]
    assert len(sigs) == 1, sigs
    tags = {k.strip(): v.strip() for k, _, v in
            (t.partition("=") for t in sigs[0].split(";") if t.strip())}
    parent = "ed.test" if domain == "ed.test" else "example.test"
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == \
        (parent, selector, algorithm, "relaxed/relaxed")
    signed_names = [h.strip().lower() for h in tags["h"].replace(" ", "").split(":")]
    assert signed_names.count("from") == 2 and signed_names.count("subject") == 2  # oversigned
    assert "received" not in signed_names and "x-spam-status" not in signed_names
    assert dkim.verify(data, dnsfunc=world.dnsfunc)
    # over-signing works: another From added downstream breaks the signature
    assert not dkim.verify(b"From: evil@evil.test\r\n" + data, dnsfunc=world.dnsfunc)


def test_untrusted_client_is_not_signed(world: World) -> None:
    data = world.send(MESSAGE.format(domain="example.test").encode(), "ops@example.test",
                      source="127.0.0.2")
    assert headers_named(data, "DKIM-Signature") == []
    assert headers_named(data, "ARC-Seal")  # sealing does not depend on the client


def test_mail_from_other_domains_is_not_signed(world: World) -> None:
    data = world.send(MESSAGE.format(domain="elsewhere.test").encode(), "ops@elsewhere.test")
    assert headers_named(data, "DKIM-Signature") == []


def via_list(sealer: str) -> bytes:
    """The corpus message as a mailing list at ``sealer`` passes it on: it checked the
    original (its A-R: dkim/dmarc pass), tagged the subject and added a footer (breaking the
    author's DKIM signature), and ARC-sealed the result with its own key."""
    original = signed()
    head, body = original.split(b"\r\n\r\n", 1)
    head = head.replace(b"Subject: Is dinner ready?", b"Subject: [list] Is dinner ready?")
    assert b"[list]" in head
    ar = (f"Authentication-Results: {sealer}; spf=pass smtp.mailfrom=joe@football.example.com;"
          f"\r\n dkim=pass header.d=football.example.com; dmarc=pass "
          f"header.from=football.example.com\r\n").encode()
    modified = ar + head + b"\r\n\r\n" + body + b"-- \r\nlist footer\r\n"
    fields = seal(modified, Sealer(sealer, "list", (DATA / "test2.private").read_bytes(),
                                   None), sealer)
    assert [n for n, _ in fields] == ["ARC-Seal", "ARC-Message-Signature",
                                      "ARC-Authentication-Results"]
    return b"".join(raw_field(n, v) for n, v in fields) + modified


def test_trusted_arc_sealer_overrides_a_dmarc_reject(world: World) -> None:
    data = world.send(via_list("lists.example.org"), "list-bounces@lists.example.org")
    values, ours = our_results(data)
    res = by_method(ours)
    assert [r.result for r in res["dkim"]] == ["fail"]  # the list broke the signature
    assert [r.result for r in res["arc"]] == ["pass"]
    [dmarc] = res["dmarc"]
    assert (dmarc.result, dmarc.policy) == ("fail", "reject")
    [raw] = [v for v in values if v.startswith(AUTHSERV)]
    assert "dmarc=fail (overridden: ARC sealed by trusted lists.example.org)" in raw, raw
    ev = world.gw.message_event(world.sink.messages[-1].data.split(b" id ", 1)[1][:16]
                                .decode())
    assert "DMARC_ARC_OVERRIDE(0)[lists.example.org]" in ev["symbols"], ev["symbols"]
    # our own seal (i=2) records the chain as it reached us
    newest = next(v for v in headers_named(data, "ARC-Seal") if re.search(r"\bi=2;", v))
    assert "cv=pass" in newest
    assert world.arc(data) == ("pass", "", 2)


def test_untrusted_arc_sealer_does_not_override(world: World) -> None:
    before = len(world.sink.messages)
    with smtplib.SMTP(*world.gw.address, timeout=20) as s:
        s.ehlo("client.example.net")
        s.mail("list-bounces@untrusted.example")
        s.rcpt(RCPT)
        code, reply = s.data(via_list("untrusted.example"))
    assert code == 550 and reply.startswith(b"5.7.1 DMARC policy of football.example.com"), \
        reply
    time.sleep(0.3)
    assert len(world.sink.messages) == before


def test_forged_results_naming_us_never_reach_the_seal_or_the_downstream(world: World) -> None:
    """Issue 25: a forged arc=pass under our authserv-id (behind nested comments, or in a form
    the authres library cannot parse) is removed before the seal is built: the AAR carries our
    own results only, the seal says cv=none, and the downstream sees one A-R naming us."""
    forged = ("Authentication-Results: (((((a) b) c) d) e) MX.gateway.test;"
              " arc=pass; dkim=pass header.d=bank.example\r\n"
              "Authentication-Results: mx.gateway.test 2; arc=pass header.d=bank.example\r\n")
    data = world.send(forged.encode() + signed(), "joe@football.example.com")
    assert b"bank.example" not in data
    naming_us = [v for v in headers_named(data, "Authentication-Results")
                 if AUTHSERV in v.lower()]
    assert len(naming_us) == 1, naming_us
    aar, = headers_named(data, "ARC-Authentication-Results")
    assert re.search(r"\barc=none\b", aar) and not re.search(r"\barc=pass\b", aar), aar
    seal, = headers_named(data, "ARC-Seal")
    assert "cv=none" in seal
    assert world.arc(data) == ("pass", "", 1)
