"""spamd and rspamd as filters end to end: the real gateway (proxy relay to the sink) with both
external scorers (real, offline daemons from tests/support) in the chain. Their imported scores
decide by the thresholds; [scores] overrides them per policy class; a rule on Rspamd's action
refuses; a scorer that is down gives NAME_ERROR and, with on_error = "continue", mail flows."""

from __future__ import annotations

import re
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import rspamd, spamd
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "gtube"
_why = spamd.spamd_unavailable_reason() or rspamd.rspamd_unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None or not CORPUS.is_dir(),
                                reason=_why or f"corpus not found at {CORPUS}")

DOMAINS = ["example.test", "lenient.test", "ruled.test"]


def corpus(name: str) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", (CORPUS / name).read_bytes())


def scorer_policy(sink_port: int, spamd_address: str, rspamd_url: str) -> dict[str, Any]:
    return base_policy(
        downstream=f"smtp://127.0.0.1:{sink_port}",
        domains={"accepted": DOMAINS},
        filters=[{"name": "rcpt", "recipients": [f"@{d}" for d in DOMAINS]},
                 {"name": "spamd", "address": spamd_address, "on_error": "continue",
                  "timeout_s": 10, "scan_timeout_s": 5},
                 {"name": "rspamd", "url": rspamd_url, "on_error": "continue",
                  "timeout_s": 10, "scan_timeout_s": 5}],
        classes={
            # the policy's [scores] beat the imported ones
            "lenient": {"domains": ["lenient.test"],
                        "scores": {"SA_GTUBE": 0.5, "RSPAMD_SCORE": 0.0}},
            # Rspamd's own action, made ours by a rule (the scores alone would accept)
            "ruled": {"domains": ["ruled.test"],
                      "scores": {"SA_GTUBE": 0.0, "RSPAMD_SCORE": 0.0},
                      "rules": [{"name": "rspamd-reject", "if_any": ["RSPAMD_ACTION_REJECT"],
                                 "action": "reject", "reply": "554 5.7.1 Refused by rspamd"}]},
        })


class World:
    def __init__(self, sink: Sink, gw: GatewayProcess) -> None:
        self.sink, self.gw = sink, gw

    def send(self, data: bytes, rcpt: str = "alice@example.test") -> tuple[int, str, dict]:
        """One message from a unique sender: the end-of-DATA reply and its log line."""
        sender = f"s{uuid.uuid4().hex[:10]}@sender.test"
        with smtplib.SMTP(*self.gw.address, timeout=30) as s:
            s.ehlo("client.sender.test")
            assert s.mail(sender)[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            code, text = s.data(data)
        ev = self.gw.wait_for(lambda e: e.get("event") == "message"
                              and e.get("sender") == sender, 15)
        return code, text.decode(), ev


def symbols(ev: dict[str, Any]) -> dict[str, float]:
    """The log line's symbols as {name: score} (``NAME(score)[options]``)."""
    out = {}
    for s in ev["symbols"]:
        m = re.match(r"([A-Z0-9_]+)\((-?[\d.e+]+)\)", s)
        assert m, s
        out[m[1]] = float(m[2])
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    sa, rs = spamd.shared(), rspamd.shared()
    with Sink() as sink:
        policy = scorer_policy(sink.port, sa.address, rs.url)
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield World(sink, gw)


def test_gtube_is_rejected_by_the_imported_scores(world: World) -> None:
    n = len(world.sink.messages)
    code, text, ev = world.send(corpus("gtube.eml"))
    assert (code, text.split(" (")[0]) == (550, "5.7.1 Message rejected by policy")
    syms = symbols(ev)
    assert syms["SA_GTUBE"] == 1000.0 and "SA_SPAM" in syms
    assert syms["RSPAMD_GTUBE"] == 0.0 and syms["RSPAMD_SCORE"] == 15.0
    assert "RSPAMD_ACTION_REJECT" in syms
    assert ev["action"] == "reject" and ev["by"] == "threshold:reject>=15"
    assert ev["score"] == pytest.approx(sum(syms.values()), abs=0.01) and ev["score"] > 1000
    assert len(world.sink.messages) == n  # nothing relayed


def test_ham_is_relayed(world: World) -> None:
    n = len(world.sink.messages)
    code, _, ev = world.send(corpus("sa-sample-nonspam.eml"))
    assert code == 250
    syms = symbols(ev)
    assert "SA_SPAM" not in syms and "SA_SCORE" in syms
    assert "RSPAMD_ACTION_REJECT" not in syms and any(s.startswith("RSPAMD_ACTION_") for s in syms)
    assert ev["score"] < 15 and ev["action"] in ("accept", "add_header")
    assert not ev.get("filter_errors")
    delivered = world.sink.wait_for(n + 1, timeout_s=10)[n].data
    assert b"TBTF ping for 2001-04-20" in delivered


def test_a_scores_entry_overrides_an_imported_score(world: World) -> None:
    code, _, ev = world.send(corpus("gtube.eml"), rcpt="bob@lenient.test")
    syms = symbols(ev)
    assert syms["SA_GTUBE"] == 0.5 and syms["RSPAMD_SCORE"] == 0.0
    assert code == 250 and ev["policy_class"] == "lenient" and ev["score"] < 15


def test_a_rule_on_rspamds_action_refuses(world: World) -> None:
    code, text, ev = world.send(corpus("gtube.eml"), rcpt="carol@ruled.test")
    assert (code, text.split(" (")[0]) == (554, "5.7.1 Refused by rspamd")
    assert ev["by"] == "rule:rspamd-reject" and ev["score"] < 15


def test_scorers_down_give_errors_and_mail_flows(gateway_factory: Any) -> None:
    dead = spamd.free_port()
    with Sink() as sink:
        gw = gateway_factory(scorer_policy(sink.port, f"127.0.0.1:{dead}",
                                           f"http://127.0.0.1:{dead}"))
        w = World(sink, gw)
        code, _, ev = w.send(corpus("gtube.eml"))
        assert code == 250
        syms = symbols(ev)
        assert (syms["SPAMD_ERROR"], syms["RSPAMD_ERROR"]) == (0.0, 0.0)
        assert any(s.startswith("SPAMD_ERROR(0)[error]") for s in ev["symbols"])
        assert set(ev["filter_errors"]) == {"spamd", "rspamd"}
        assert not any(s.startswith(("SA_", "RSPAMD_ACTION")) for s in syms)
        sink.wait_for(1, timeout_s=10)
