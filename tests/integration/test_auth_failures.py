"""SPF/DKIM/DMARC failure behaviour end to end: the real gateway (proxy relay to the sink) with
``[dns] nameservers`` pointing at the loopback test DNS server (tests/support/dnsserver.py).

* an SPF ``-all`` fail refused at MAIL by a ``stage = "mail"`` rule (default and configured
  reply), while a passing sender from the same client IP is relayed;
* softfail / none / temperror (SERVFAIL) never refuse by themselves;
* dead DNS (names the server never answers, and a nameserver port where nothing answers at
  all): every stage answers within its DNS budget, the message is relayed with the
  ``*_TEMPERROR`` symbols and ``spf=temperror`` in Authentication-Results, and a ``p=reject``
  From domain is not rejected on a temperror;
* the filter's own pipeline ``timeout_s`` shorter than the DNS wait: the ``on_error`` path
  (``SPF_ERROR``; ``tempfail`` -> 451 4.3.0, ``continue`` -> relayed).

The client is always 127.0.0.1. Zone (``ip4:127.0.0.1`` = pass for this client):
  pass.test    SPF ip4:127.0.0.1 -all, DMARC p=reject
  fail.test    SPF ip4:192.0.2.1 -all
  soft.test    SPF ip4:192.0.2.1 ~all
  nospf.test   an MX only (no TXT): SPF none
  broken.test  SERVFAIL: SPF temperror at once
  slow.test    never answered (SPF TXT, _dmarc, the DKIM key): every lookup times out
  strict.test  SPF and the DKIM key never answered, but ``_dmarc.strict.test`` p=reject is
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.integration.test_auth_e2e import DATA, by_method, our_results, txt
from tests.support.dnsserver import DnsServer, silent_udp_port
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"DKIM corpus not found at {DATA}")

RCPT = "alice@example.test"
DNS_TIMEOUT_S = 1.0  # [dns] timeout_s: one query's deadline
SPF_CHECK_S = 1.5  # spf check_timeout_s: the whole SPF check
DKIM_DNS_S = 1.0  # dkim dns_timeout_s: the key prefetch
FILTER_TIMEOUT_S = 3.0  # each auth filter's pipeline timeout_s (above the DNS budgets)
MARGIN_S = 1.5
QID_RE = re.compile(r"(?:queued as |\()([0-9A-Za-z]+)\)?$")


def zone() -> str:
    return "".join([
        txt("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        txt("_dmarc.pass.test", "v=DMARC1; p=reject"),
        txt("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
        txt("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
        "nospf.test. 60 IN MX 10 mx.nospf.test.\n",
        txt("slow.test", "v=spf1 ip4:127.0.0.1 -all"),  # dropped: never answered
        txt("_dmarc.slow.test", "v=DMARC1; p=reject"),  # dropped
        txt("strict.test", "v=spf1 ip4:127.0.0.1 -all"),  # dropped
        txt("_dmarc.strict.test", "v=DMARC1; p=reject"),  # answered
        txt("test._domainkey.strict.test", (DATA / "test.txt").read_text().strip()),  # dropped
        txt("test._domainkey.pass.test", (DATA / "test.txt").read_text().strip()),
    ])


DROP = ("slow.test", "_dmarc.slow.test", "test._domainkey.slow.test",
        "strict.test", "test._domainkey.strict.test")
SERVFAIL = ("broken.test",)


def message(sender: str, *, sign: bool = False, subject: str = "auth failure test") -> bytes:
    domain = sender.rsplit("@", 1)[1]
    msg = (f"From: Joe <{sender}>\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
           f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
           "\r\nHello.\r\n").encode()
    if sign:
        sig = dkim.sign(msg, b"test", domain.encode(), (DATA / "test.private").read_bytes(),
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        msg = sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + msg
    return msg


def qid_of(reply: bytes) -> str:
    m = QID_RE.search(reply.decode().strip())
    assert m, reply
    return m.group(1)


def names(ev: dict[str, Any]) -> set[str]:
    return {s.split("(", 1)[0] for s in ev["symbols"]}


def symbol(ev: dict[str, Any], name: str) -> str:
    found = [s for s in ev["symbols"] if s.split("(", 1)[0] == name]
    assert len(found) == 1, ev["symbols"]
    return found[0]


class World:
    def __init__(self, sink: Sink, gw: GatewayProcess, ns: DnsServer | None = None) -> None:
        self.sink, self.gw, self.ns = sink, gw, ns

    def transaction(self, sender: str, data: bytes | None = None
                    ) -> tuple[tuple[int, bytes], tuple[int, bytes] | None, float, float]:
        """MAIL (and, if accepted, RCPT + DATA): (MAIL reply, end-of-data reply or None,
        MAIL's seconds, end-of-data's seconds)."""
        with smtplib.SMTP(*self.gw.address, timeout=20) as s:
            s.ehlo("client.test")
            t0 = time.monotonic()
            mail = s.mail(sender)
            mail_s = time.monotonic() - t0
            if mail[0] != 250:
                assert s.rcpt(RCPT)[0] == 503  # no transaction: nothing to add a recipient to
                return mail, None, mail_s, 0.0
            code, reply = s.rcpt(RCPT)
            assert code == 250, reply
            code, reply = s.docmd("DATA")
            assert code == 354, reply
            t0 = time.monotonic()
            body = data if data is not None else message(sender)
            s.send(re.sub(rb"(?m)^\.", b"..", body) + b".\r\n")  # CRLF text, dot-stuffed
            end = s.getreply()
            return mail, end, mail_s, time.monotonic() - t0

    def relayed(self, before: int) -> Any:
        return self.sink.wait_for(before + 1, timeout_s=10)[before]

    def nothing_relayed(self, before: int, commands_before: int) -> None:
        """No message arrived at the sink, and no command since ``commands_before`` but the
        QUIT that closes a connection idle since an earlier message (relay.connection_reuse_s)."""
        with pytest.raises(AssertionError):  # the sink's wait_for times out
            self.sink.wait_for(before + 1, timeout_s=0.5)
        assert len(self.sink.messages) == before
        assert [c for c in self.sink.commands[commands_before:] if c != "QUIT"] == []


def auth_filters(spf: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [{"name": "rcpt", "recipients": ["@example.test"]},
            {"name": "spf", "check_timeout_s": SPF_CHECK_S, "timeout_s": FILTER_TIMEOUT_S,
             **(spf or {})},
            {"name": "dkim", "dns_timeout_s": DKIM_DNS_S, "timeout_s": FILTER_TIMEOUT_S},
            {"name": "dmarc", "timeout_s": FILTER_TIMEOUT_S},
            {"name": "authres"}]


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(zone(), drop=DROP, servfail=SERVFAIL) as ns:
        yield ns


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def start(tmp: Path, sink: Sink, nameserver: str, **sections: Any) -> GatewayProcess:
    policy = base_policy(downstream=f"smtp://127.0.0.1:{sink.port}",
                         dns={"nameservers": [nameserver], "timeout_s": DNS_TIMEOUT_S},
                         **sections)
    return GatewayProcess(tmp, policy).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dns: DnsServer, sink: Sink
          ) -> Iterator[World]:
    """The auth chain with a ``stage = "mail"`` rule refusing SPF_FAIL (default reply)."""
    gw = start(tmp_path_factory.mktemp("gw"), sink, f"127.0.0.1:{dns.port}",
               filters=auth_filters(),
               rules=[{"name": "spf_fail", "if_any": ["SPF_FAIL"], "stage": "mail",
                       "action": "reject"}])
    try:
        yield World(sink, gw, dns)
    finally:
        gw.stop()


# -- 1. SPF fail refused at MAIL ------------------------------------------------------------------

def test_spf_fail_refused_at_mail_and_pass_relayed(world: World) -> None:
    before, commands = len(world.sink.messages), len(world.sink.commands)
    (code, reply), end, _, _ = world.transaction("joe@fail.test")
    assert (code, reply.split(b" ", 1)[0]) == (550, b"5.7.1"), reply
    assert end is None
    qid = qid_of(reply)
    ev = world.gw.message_event(qid)
    assert ev["action"] == "reject" and ev["by"] == "rule:spf_fail", ev
    assert ev["sender"] == "joe@fail.test" and ev["rcpts"] == []
    assert ev["relay"] == "not relayed"
    assert ev["reply"].startswith("550 5.7.1 ") and ev["reply"].endswith(f"({qid})")
    assert symbol(ev, "SPF_FAIL").startswith("SPF_FAIL(0)[-all")
    world.nothing_relayed(before, commands)

    # the same client IP, a sender whose domain's SPF lists it: 250 at MAIL, relayed
    (code, reply), end, _, _ = world.transaction("joe@pass.test")
    assert code == 250, reply
    assert end is not None and end[0] == 250, end
    msg = world.relayed(before)
    assert msg.mail_from == "joe@pass.test" and msg.rcpts == (RCPT,)
    ev = world.gw.message_event(qid_of(end[1]))
    assert ev["action"] == "accept"
    assert {"SPF_PASS", "DKIM_NONE", "DMARC_PASS"} <= names(ev), ev["symbols"]
    res = by_method(our_results(msg.data)[1])
    assert [(r.result, r.smtp_mailfrom) for r in res["spf"]] == [("pass", "joe@pass.test")]


def test_spf_fail_with_configured_rule_reply(tmp_path: Path, dns: DnsServer, sink: Sink
                                             ) -> None:
    gw = start(tmp_path, sink, f"127.0.0.1:{dns.port}", filters=auth_filters(),
               rules=[{"name": "spf_fail", "if_any": ["SPF_FAIL"], "stage": "mail",
                       "action": "reject",
                       "reply": "550 5.7.23 SPF validation failed"}])
    try:
        w = World(sink, gw, dns)
        before, commands = len(sink.messages), len(sink.commands)
        (code, reply), end, _, _ = w.transaction("joe@fail.test")
        assert code == 550, reply
        qid = qid_of(reply)
        assert reply.decode() == f"5.7.23 SPF validation failed ({qid})"
        ev = gw.message_event(qid)
        assert ev["by"] == "rule:spf_fail" and ev["reply"] == f"550 5.7.23 {reply.decode()[7:]}"
        w.nothing_relayed(before, commands)
    finally:
        gw.stop()


# -- 2. softfail / none / temperror are only symbols ----------------------------------------------

@pytest.mark.parametrize(("sender", "sym", "ar"), [
    ("joe@soft.test", "SPF_SOFTFAIL", "softfail"),
    ("joe@nospf.test", "SPF_NONE", "none"),
    ("joe@broken.test", "SPF_TEMPERROR", "temperror"),
])
def test_spf_non_fail_results_do_not_refuse(world: World, sender: str, sym: str, ar: str
                                            ) -> None:
    before = len(world.sink.messages)
    (code, reply), end, _, _ = world.transaction(sender)
    assert code == 250, reply
    assert end is not None and end[0] == 250 and end[1].startswith(b"2.0.0 "), end
    msg = world.relayed(before)
    assert msg.mail_from == sender
    ev = world.gw.message_event(qid_of(end[1]))
    assert (ev["action"], ev["by"]) == ("accept", "score"), ev
    assert ev["relay"] != "not relayed"
    assert symbol(ev, sym).startswith(f"{sym}(0)")
    assert not {n for n in names(ev) if n.startswith("SPF_")} - {sym}
    res = by_method(our_results(msg.data)[1])
    assert [r.result for r in res["spf"]] == [ar]


# -- 3./4. dead DNS: temperror within the budget, never a refusal --------------------------------

def test_dead_dns_names_give_temperror_within_budget(world: World) -> None:
    """slow.test: SPF TXT, the DKIM key and _dmarc are never answered (From = p=reject
    published, but unreachable)."""
    before = len(world.sink.messages)
    sender = "joe@slow.test"
    (code, reply), end, mail_s, end_s = world.transaction(sender, message(sender, sign=True))
    assert code == 250, reply
    assert DNS_TIMEOUT_S - 0.2 < mail_s < SPF_CHECK_S + MARGIN_S, mail_s
    assert end is not None and end[0] == 250, end
    # the DKIM key prefetch, then (dmarc requires dkim) the _dmarc lookup
    assert end_s < DKIM_DNS_S + DNS_TIMEOUT_S + MARGIN_S, end_s
    msg = world.relayed(before)
    ev = world.gw.message_event(qid_of(end[1]))
    assert ev["action"] == "accept" and ev["filter_errors"] is None, ev
    assert {"SPF_TEMPERROR", "DKIM_TEMPERROR", "DMARC_TEMPERROR"} <= names(ev), ev["symbols"]
    assert "_dmarc.slow.test" in symbol(ev, "DMARC_TEMPERROR")
    assert not {n for n in names(ev) if n.endswith("_ERROR")}
    res = by_method(our_results(msg.data)[1])
    assert [(r.result, r.smtp_mailfrom) for r in res["spf"]] == [("temperror", sender)]
    assert [(r.result, r.header_d) for r in res["dkim"]] == [("temperror", "slow.test")]
    assert [r.result for r in res["dmarc"]] == ["temperror"]
    assert ("slow.test", "TXT", "udp") in world.ns.queries  # type: ignore[union-attr]


def test_p_reject_domain_not_rejected_when_auth_times_out(world: World) -> None:
    """strict.test publishes p=reject (answered) but its SPF record and DKIM key are never
    answered: no aligned pass, yet a temperror -> DMARC_TEMPERROR, relayed, not 550."""
    before = len(world.sink.messages)
    sender = "joe@strict.test"
    (code, reply), end, mail_s, end_s = world.transaction(sender, message(sender, sign=True))
    assert code == 250, reply
    assert mail_s < SPF_CHECK_S + MARGIN_S, mail_s
    assert end is not None and end[0] == 250, end
    assert end_s < DKIM_DNS_S + MARGIN_S, end_s
    msg = world.relayed(before)
    ev = world.gw.message_event(qid_of(end[1]))
    assert ev["action"] == "accept", ev
    assert {"SPF_TEMPERROR", "DKIM_TEMPERROR", "DMARC_TEMPERROR"} <= names(ev), ev["symbols"]
    assert "DMARC_FAIL" not in names(ev)
    res = by_method(our_results(msg.data)[1])
    assert res["spf"][0].result == "temperror"
    assert [(r.result, r.header_from, r.policy) for r in res["dmarc"]] == \
        [("temperror", "strict.test", "reject")]


def test_silent_nameserver_full_transaction_within_budget(tmp_path: Path, sink: Sink) -> None:
    """[dns] points at a UDP port where nothing ever answers: every lookup times out."""
    silent = silent_udp_port()
    try:
        gw = start(tmp_path, sink, f"127.0.0.1:{silent.getsockname()[1]}",
                   filters=auth_filters())
        try:
            w = World(sink, gw)
            before = len(sink.messages)
            sender = "joe@pass.test"  # would pass everything with a working DNS
            (code, reply), end, mail_s, end_s = w.transaction(sender, message(sender, sign=True))
            assert code == 250, reply
            assert mail_s < SPF_CHECK_S + MARGIN_S, mail_s
            assert end is not None and end[0] == 250, end
            assert end_s < DKIM_DNS_S + DNS_TIMEOUT_S + MARGIN_S, end_s
            msg = w.relayed(before)
            ev = gw.message_event(qid_of(end[1]))
            assert ev["action"] == "accept" and ev["filter_errors"] is None, ev
            assert {"SPF_TEMPERROR", "DKIM_TEMPERROR", "DMARC_TEMPERROR"} <= names(ev)
            res = by_method(our_results(msg.data)[1])
            assert [(r.result, r.smtp_mailfrom) for r in res["spf"]] == [("temperror", sender)]
            assert [r.result for r in res["dkim"]] == ["temperror"]
            assert [r.result for r in res["dmarc"]] == ["temperror"]
        finally:
            gw.stop()
    finally:
        silent.close()


# -- 3b. the filter's own timeout below the DNS wait: on_error -----------------------------------

SHORT_S = 0.5  # spf pipeline timeout_s, below [dns] timeout_s and check_timeout_s


@pytest.mark.parametrize("early_rule", [True, False])
def test_spf_filter_timeout_on_error_tempfail(tmp_path: Path, dns: DnsServer, sink: Sink,
                                              early_rule: bool) -> None:
    """With a rule that needs SPF at MAIL, spf runs in the foreground: the 451 is MAIL's
    answer. Without one, spf runs in the background while RCPT and DATA stream in: MAIL is
    answered at once and the filter's tempfail comes at the end of data."""
    rules = [{"name": "spf_fail", "if_any": ["SPF_FAIL"], "stage": "mail",
              "action": "reject"}] if early_rule else []
    gw = start(tmp_path, sink, f"127.0.0.1:{dns.port}",
               filters=auth_filters({"timeout_s": SHORT_S}), rules=rules)
    try:
        w = World(sink, gw, dns)
        before, commands = len(sink.messages), len(sink.commands)
        (code, reply), end, mail_s, end_s = w.transaction("joe@slow.test")
        if early_rule:
            assert (code, reply.split(b" ", 1)[0]) == (451, b"4.3.0"), reply
            assert SHORT_S - 0.1 < mail_s < SHORT_S + MARGIN_S, mail_s
        else:
            assert code == 250 and mail_s < 0.3, (reply, mail_s)
            assert end is not None, reply
            code, reply = end
            assert (code, reply.split(b" ", 1)[0]) == (451, b"4.3.0"), reply
            assert end_s < SHORT_S + MARGIN_S, end_s
        qid = qid_of(reply)
        ev = gw.message_event(qid)
        assert ev["action"] == "tempfail" and ev["by"] == "filter:spf", ev
        assert symbol(ev, "SPF_ERROR") == "SPF_ERROR(0)[timeout]"
        assert ev["filter_errors"] == {"spf": "timeout"}
        assert ev["reply"] == f"451 4.3.0 Temporary local problem, try again later ({qid})"
        if early_rule:
            w.nothing_relayed(before, commands)
        else:  # proxy mode had opened the downstream at RCPT; nothing was relayed
            time.sleep(0.3)
            assert len(sink.messages) == before
    finally:
        gw.stop()


def test_spf_filter_timeout_on_error_continue(tmp_path: Path, dns: DnsServer, sink: Sink
                                              ) -> None:
    """SPF_ERROR with on_error = "continue": relayed, and DMARC (strict.test publishes p=reject,
    the message is unsigned) counts the unevaluated SPF as a temperror — no 550."""
    gw = start(tmp_path, sink, f"127.0.0.1:{dns.port}",
               filters=auth_filters({"timeout_s": SHORT_S, "on_error": "continue"}))
    try:
        w = World(sink, gw, dns)
        before = len(sink.messages)
        sender = "joe@strict.test"
        (code, reply), end, mail_s, end_s = w.transaction(sender)
        assert code == 250 and mail_s < 0.3, (reply, mail_s)  # spf runs in the background
        assert end is not None and end[0] == 250, end
        assert end_s < SHORT_S + DNS_TIMEOUT_S + MARGIN_S, end_s
        msg = w.relayed(before)
        assert msg.mail_from == sender
        ev = gw.message_event(qid_of(end[1]))
        assert ev["action"] == "accept", ev
        assert symbol(ev, "SPF_ERROR") == "SPF_ERROR(0)[timeout]"
        assert ev["filter_errors"] == {"spf": "timeout"}
        assert not {n for n in names(ev) if n.startswith("SPF_")} - {"SPF_ERROR"}
        assert symbol(ev, "DMARC_TEMPERROR") == \
            "DMARC_TEMPERROR(0)[no aligned pass; SPF temperror]"
        res = by_method(our_results(msg.data)[1])
        assert [r.result for r in res["spf"]] == ["temperror"]  # the check did not finish
        assert [(r.result, r.header_from, r.policy) for r in res["dmarc"]] == \
            [("temperror", "strict.test", "reject")]
    finally:
        gw.stop()


# -- per-message DNS lookup limit -----------------------------------------------------------------

def test_per_message_lookup_limit_gives_temperror_not_failure(tmp_path: Path, dns: DnsServer,
                                                              sink: Sink) -> None:
    """[dns] max_queries_per_message = 1: SPF (pass.test: one TXT lookup) uses the budget; the
    DKIM key is then not asked and is a temperror, never a failure. DMARC's own few lookups
    do not draw on the budget (a sender's SPF record must not starve them): it passes on the
    aligned SPF."""
    policy_dns = {"nameservers": [f"127.0.0.1:{dns.port}"], "timeout_s": DNS_TIMEOUT_S,
                  "max_queries_per_message": 1}
    gw = GatewayProcess(tmp_path / "limited", base_policy(
        downstream=f"smtp://127.0.0.1:{sink.port}", dns=policy_dns,
        filters=auth_filters())).start()
    try:
        w = World(sink, gw, dns)
        before = len(sink.messages)
        asked_before = len(dns.queries)
        sender = "joe@pass.test"
        (code, _), end, _, _ = w.transaction(sender, message(sender, sign=True))
        assert code == 250 and end is not None and end[0] == 250, end
        ev = gw.message_event(qid_of(end[1]))
        assert {"SPF_PASS", "DKIM_TEMPERROR", "DMARC_PASS"} <= names(ev), ev["symbols"]
        res = by_method(our_results(w.relayed(before).data)[1])
        assert [r.result for r in res["dkim"]] == ["temperror"]
        asked = [q[0] for q in dns.queries[asked_before:]]
        assert "test._domainkey.pass.test" not in asked and "_dmarc.pass.test" in asked
    finally:
        gw.stop()


# -- SPF in the background --------------------------------------------------------------------------

def test_spf_runs_while_rcpt_and_data_stream_in(tmp_path: Path, sink: Sink) -> None:
    """Without a rule needing SPF before the message stage, the check starts at MAIL and MAIL
    is answered at once; the result (SPF_PASS, 0.8 s late) is there at end of data, feeding
    DMARC and Authentication-Results. An aborted transaction (RSET) cancels the check."""
    zone = (txt("delayed.test", "v=spf1 ip4:127.0.0.1 -all")
            + txt("_dmarc.delayed.test", "v=DMARC1; p=reject")
            + txt("delayed2.test", "v=spf1 ip4:127.0.0.1 -all"))
    with DnsServer(zone, delay={"delayed.test": 0.8, "delayed2.test": 0.8}) as ns:
        gw = start(tmp_path, sink, f"127.0.0.1:{ns.port}", filters=auth_filters())
        try:
            w = World(sink, gw, ns)
            before = len(sink.messages)
            sender = "joe@delayed.test"
            (code, _), end, mail_s, end_s = w.transaction(sender)
            assert code == 250 and mail_s < 0.3, mail_s
            assert end is not None and end[0] == 250, end
            ev = gw.message_event(qid_of(end[1]))
            assert "SPF_PASS(0)[ip4:127.0.0.1]" in ev["symbols"], ev["symbols"]
            assert "DMARC_PASS(0)" in ev["symbols"], ev["symbols"]  # SPF-aligned
            res = by_method(our_results(w.relayed(before).data)[1])
            assert [r.result for r in res["spf"]] == ["pass"]
            # RSET while the check is running: the transaction ends, the check is cancelled
            # (another domain: delayed.test's answer is cached now, and a check whose lookups
            # are all cached is done before MAIL is answered)
            with smtplib.SMTP(*gw.address, timeout=20) as s:
                s.ehlo("client.test")
                code, reply = s.mail("joe@delayed2.test")
                assert code == 250
                assert s.rset()[0] == 250
            ev = gw.wait_for(lambda e: e.get("event") == "message" and e.get("action")
                             == "aborted")
            assert not [x for x in ev["symbols"] if x.startswith("SPF_")], ev["symbols"]
        finally:
            gw.stop()
