"""One finding is scored once, with the shipped default policy (policies/default.toml, DNS from
a loopback server) through the real gateway: a message without Message-ID scores
HEADERS_MISSING_MESSAGE_ID and nothing else for it (the rule file does not test it again); a
missing, repeated or unparsable From scores HEADERS_*_FROM only, while dmarc explains in the
trace why it was not evaluated (DMARC_NO_FROM, 0), or, for one author domain beside an unusable
part, evaluates it and explains the rest (DMARC_FROM_UNUSABLE_PART, 0). Each message is compared with the same one
whose header is intact: the score differs by exactly the one symbol's score."""

from __future__ import annotations

import re
import smtplib
import tomllib

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.gateway import REPO

SENDER = "bob@sender.test"
ZONE = ('sender.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"\n'
        '_dmarc.sender.test. 60 IN TXT "v=DMARC1; p=none"\n')
GOOD = (f"From: {SENDER}\r\nTo: alice@example.test\r\nSubject: lunch on friday\r\n"
        "Date: Tue, 08 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@sender.test>\r\n"
        "\r\nShall we meet at noon as usual?\r\n")
SCORES = tomllib.loads((REPO / "policies" / "default.toml").read_text())["scores"]


@pytest.fixture
def gw(gateway_factory):
    text = (REPO / "policies" / "default.toml").read_text()
    with DnsServer(ZONE) as ns:
        text = text.replace('"127.0.0.1:2525"', '"127.0.0.1:0"').replace(
            "nameservers = []", f'nameservers = ["127.0.0.1:{ns.port}"]')
        gw = gateway_factory(text, name="policies/default.toml")  # its rules: shipped = true
        yield gw


@pytest.mark.parametrize("broken, symbol, explained", [
    (GOOD.replace("Message-ID: <m1@sender.test>\r\n", ""), "HEADERS_MISSING_MESSAGE_ID", None),
    (GOOD.replace(f"From: {SENDER}\r\n", ""), "HEADERS_MISSING_FROM",
     "DMARC_NO_FROM(0)[no From header]"),
    # both From headers' domains checked (a client shows one), explained unscored
    ("From: carol@sender.test\r\n" + GOOD, "HEADERS_MULTIPLE_FROM",
     "DMARC_SEVERAL_FROM(0)[2 From headers: sender.test each checked]"),
    (GOOD.replace(f"From: {SENDER}", "From: Bob <bob@>"), "HEADERS_BAD_FROM",
     "DMARC_NO_FROM(0)[Unable to extract From domain: Bob <bob@>]"),
    # one author domain beside an address without a domain: still evaluated (DMARC_PASS), the
    # unusable part explained, not scored again as DMARC_BAD_FROM (2 + 3 reached add_header)
    (GOOD.replace(f"From: {SENDER}", f"From: {SENDER}, carol@"), "HEADERS_BAD_FROM",
     "DMARC_FROM_UNUSABLE_PART(0)[From read two ways: sender.test and unusable text"),
    (GOOD.replace(f"From: {SENDER}", f"From: Bob <{SENDER}>, @x.test"), "HEADERS_BAD_FROM",
     "DMARC_FROM_UNUSABLE_PART(0)[From read two ways: sender.test and unusable text"),
])
def test_a_header_finding_is_scored_once(gw, broken, symbol, explained):
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.sendmail(SENDER, ["alice@example.test"], GOOD.encode())
        s.sendmail(SENDER, ["alice@example.test"], broken.encode())
    gw.wait_for(lambda e: len(gw.events("message")) >= 2, 20)
    good, bad = gw.events("message")[:2]
    assert good["score"] == 0 and "DMARC_PASS(0)" in good["symbols"], good["symbols"]
    extra = sorted(set(bad["symbols"]) - set(good["symbols"]))
    scored = [x for x in extra if not re.search(r"\(0\)(\[|$)", x)]
    # exactly one scored symbol for the finding, and the score rises by its score alone
    assert [x.split("(")[0] for x in scored] == [symbol], bad["symbols"]
    assert bad["score"] == pytest.approx(SCORES[symbol]), bad["symbols"]
    if explained is not None:  # the trace still says why DMARC was not (fully) evaluated
        assert any(x.startswith(explained) for x in bad["symbols"]), bad["symbols"]
    if "UNUSABLE_PART" in (explained or ""):
        assert "DMARC_PASS(0)" in bad["symbols"], bad["symbols"]
