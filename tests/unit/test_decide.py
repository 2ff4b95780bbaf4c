"""Decision precedence: filter verdicts, then rules (first match, by stage), then thresholds."""

from __future__ import annotations

from gateway.decide import Scorecard, decide
from gateway.filterapi import Action, Result, Stage, Symbol, Verdict
from gateway.pipeline import FilterOutcome
from gateway.policy.loader import parse_policy
from gateway.replies import Reply


def policy(**kw):
    return parse_policy({"domains": {"accepted": ["example.test"]}, **kw}, "t.toml")


def outcome(name, *symbols, verdict=None, stage=Stage.MESSAGE):
    syms = tuple(s if isinstance(s, Symbol) else Symbol(s) for s in symbols)
    return FilterOutcome(name, stage, Result(symbols=syms, verdict=verdict), 1.0)


def final(p, outs, cls=None):
    cls = cls or p.default_class
    card = Scorecard(list(outs))
    return decide(card.symbols(cls), outs, cls, Stage.MESSAGE, card.score(cls))


def test_thresholds_pick_the_highest_reached_action():
    p = policy(scores={"A": 3.0, "B": 4.0}, actions={"add_header": 5, "quarantine": 7,
                                                    "reject": 10})
    assert final(p, [outcome("f", "A")]).action is Action.ACCEPT
    d = final(p, [outcome("f", "A", "B")])
    assert (d.action, d.score, d.by) == (Action.QUARANTINE, 7.0, "threshold:quarantine>=7")
    d = final(p, [outcome("f", "A"), outcome("g", "B", "A")])  # a symbol counts once
    assert d.score == 7.0


def test_reject_threshold_gives_a_5xx_reply():
    p = policy(scores={"A": 20.0})
    d = final(p, [outcome("f", "A")])
    assert d.action is Action.REJECT and d.reply is not None and d.reply.code == 550
    assert d.reply.status == "5.7.1"


def test_filter_verdict_beats_rules_and_scores():
    p = policy(rules=[{"name": "ok", "if_any": ["A"], "action": "accept"}])
    v = Verdict(Action.REJECT, Reply(554, "5.7.1", "virus found"), "virus")
    d = final(p, [outcome("f", "A"), outcome("clam", verdict=v)])
    assert (d.action, d.by, d.reply) == (Action.REJECT, "filter:clam", v.reply)


def test_most_severe_verdict_wins():
    q = Verdict(Action.QUARANTINE)
    t = Verdict(Action.TEMPFAIL)
    d = final(policy(), [outcome("a", verdict=q), outcome("b", verdict=t)])
    assert d.action is Action.TEMPFAIL and d.reply is not None and d.reply.code == 451


def test_first_matching_rule_wins_and_conditions_combine():
    p = policy(scores={"S": 100.0}, rules=[
        {"name": "needs-both", "if_all": ["A", "B"], "action": "reject"},
        {"name": "a-not-c", "if_any": ["A"], "unless_any": ["C"], "action": "quarantine"},
        {"name": "allow", "if_any": ["A"], "action": "accept"},
    ])
    assert final(p, [outcome("f", "A", "B")]).by == "rule:needs-both"
    assert final(p, [outcome("f", "A")]).by == "rule:a-not-c"
    d = final(p, [outcome("f", "A", "C", "S")])
    assert (d.action, d.by) == (Action.ACCEPT, "rule:allow")  # whitelists despite score 100


def test_rules_fire_only_from_their_stage_and_only_refusals_early():
    p = policy(rules=[
        {"name": "spf", "if_any": ["SPF_FAIL"], "action": "reject", "stage": "mail",
         "reply": "550 5.7.23 SPF check failed"},
        {"name": "late", "if_any": ["X"], "action": "reject"},
    ])
    cls = p.default_class
    syms = [Symbol("SPF_FAIL"), Symbol("X")]
    assert decide(syms, [], cls, Stage.CONNECT, 0) is None
    d = decide(syms, [], cls, Stage.MAIL, 0)
    assert d is not None and d.reply == Reply(550, "5.7.23", "SPF check failed")
    assert decide([Symbol("X")], [], cls, Stage.RCPT, 0) is None
    d = decide([Symbol("X")], [], cls, Stage.MESSAGE, 0)
    assert d is not None and d.by == "rule:late"


def test_early_stage_ignores_non_refusing_verdicts():
    q = outcome("f", verdict=Verdict(Action.QUARANTINE), stage=Stage.MAIL)
    assert decide([], [q], policy().default_class, Stage.MAIL, 0) is None


def test_class_overrides_scores_and_thresholds():
    p = policy(domains={"accepted": ["example.test", "strict.test"]}, scores={"A": 2.0},
               classes={"strict": {"domains": ["strict.test"], "scores": {"A": 9.0},
                                   "actions": {"reject": 8.0}}})
    strict = p.class_for_domain("STRICT.test")
    assert strict.name == "strict" and p.class_for_domain("example.test").name == "default"
    assert final(p, [outcome("f", "A")]).action is Action.ACCEPT
    assert final(p, [outcome("f", "A")], strict).action is Action.REJECT


def test_a_symbols_own_score_applies_unless_the_policy_scores_it():
    p = policy(scores={"SA_GTUBE": 2.0})
    card = Scorecard([outcome("spamd", Symbol("SA_GTUBE", ("1000",), score=1000.0),
                              Symbol("SA_OTHER", score=3.5), Symbol("PLAIN"))])
    scored = {s.name: s.score for s in card.symbols(p.default_class)}
    assert scored == {"SA_GTUBE": 2.0, "SA_OTHER": 3.5, "PLAIN": 0.0}
    assert card.score(p.default_class) == 5.5
