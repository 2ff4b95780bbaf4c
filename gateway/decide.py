"""Turn filter outcomes into exactly one action: the scorecard and the decision.

Order of precedence (documented in docs/policy.md):
1. a filter's hard verdict (the most severe one, if several) — e.g. unknown user, virus;
2. else the first rule, in file order, whose conditions match and whose stage has been reached;
3. else the score thresholds of the recipient's policy class (message stage only).
Before the message stage only refusing actions (reject, tempfail) take effect; everything else
waits for the end of DATA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.filterapi import Action, Edit, Stage, Symbol, Verdict
from gateway.pipeline import FilterOutcome
from gateway.policy.schema import PolicyClass
from gateway.replies import Reply

DEFAULT_REPLIES = {
    Action.REJECT: Reply(550, "5.7.1", "Message rejected by policy"),
    Action.TEMPFAIL: Reply(451, "4.7.1", "Message deferred by policy, try again later"),
}


@dataclass(frozen=True, slots=True)
class ScoredSymbol:
    name: str
    score: float
    options: tuple[str, ...]
    filter: str


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    score: float
    by: str  # what chose the action: "filter:rcpt", "rule:no-from", "threshold:reject>=15"
    reply: Reply | None = None  # for reject/tempfail
    reason: str = ""


@dataclass
class Scorecard:
    """Everything the filters reported for one transaction, stage by stage."""

    outcomes: list[FilterOutcome] = field(default_factory=list)

    def add(self, outcomes: Iterable[FilterOutcome]) -> None:
        self.outcomes.extend(outcomes)

    def symbols(self, cls: PolicyClass) -> list[ScoredSymbol]:
        seen: dict[str, ScoredSymbol] = {}
        for o in self.outcomes:
            for s in o.result.symbols:
                if s.name not in seen:
                    default = s.score if s.score is not None else 0.0
                    seen[s.name] = ScoredSymbol(s.name, cls.scores.get(s.name, default),
                                                s.options, o.name)
        return list(seen.values())

    def score(self, cls: PolicyClass) -> float:
        return round(sum(s.score for s in self.symbols(cls)), 3)

    def edits(self) -> list[Edit]:
        return [e for o in self.outcomes for e in o.result.edits]

    def stage_ms(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for o in self.outcomes:
            out[o.stage.value] = round(max(out.get(o.stage.value, 0.0), o.elapsed_ms), 2)
        return out

    def errors(self) -> dict[str, str]:
        return {o.name: o.error for o in self.outcomes if o.error}


def strongest_verdict(outcomes: Iterable[FilterOutcome]) -> tuple[str, Verdict] | None:
    best: tuple[str, Verdict] | None = None
    for o in outcomes:
        v = o.result.verdict
        if v is not None and (best is None or v.action.severity > best[1].action.severity):
            best = (o.name, v)
    return best


def reply_for(action: Action, custom: Reply | None) -> Reply | None:
    if not action.refuses:
        return None
    if custom is not None and custom.code >= 400:
        return custom
    return DEFAULT_REPLIES[action]


def decide(symbols: Iterable[Symbol | ScoredSymbol], verdict_outcomes: Iterable[FilterOutcome],
           cls: PolicyClass, stage: Stage, score: float) -> Decision | None:
    """The decision at ``stage``; None before the message stage when nothing refuses yet."""
    final = stage is Stage.MESSAGE
    verdict = strongest_verdict(verdict_outcomes)
    if verdict is not None and (final or verdict[1].action.refuses):
        name, v = verdict
        return Decision(v.action, score, f"filter:{name}", reply_for(v.action, v.reply),
                        v.reason)
    names = frozenset(s.name for s in symbols)
    for rule in cls.rules:
        if rule.stage.order > stage.order or not rule.matches(names):
            continue
        if not final and not rule.action.refuses:
            continue
        return Decision(rule.action, score, f"rule:{rule.name}",
                        reply_for(rule.action, rule.reply))
    if not final:
        return None
    action, at = cls.thresholds.action_for(score)
    if at is None:
        return Decision(Action.ACCEPT, score, "score")
    return Decision(action, score, f"threshold:{action.value}>={at:g}", reply_for(action, None))
