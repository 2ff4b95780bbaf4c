"""The pipeline: concurrency within a stage, requires ordering, timeouts and on_error."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.filterapi import Action, Client, FilterContext, Result, Stage, Symbol
from gateway.pipeline import Pipeline
from gateway.registry import LoadedFilter


class Sleepy:
    def __init__(self, name: str, delay: float, requires: tuple[str, ...] = ()) -> None:
        self.name, self.delay, self.requires = name, delay, requires
        self.seen: dict[str, Result] = {}

    async def on_message(self, ctx: FilterContext) -> Result:
        self.seen = dict(ctx.results)
        await asyncio.sleep(self.delay)
        return Result(symbols=(Symbol(self.name.upper()),), data={"done": time.monotonic()})


class Boom:
    async def on_message(self, ctx: FilterContext) -> Result:
        raise ValueError("secret detail")


class NotAResult:
    async def on_message(self, ctx: FilterContext) -> Result:
        return "nope"  # type: ignore[return-value]


def loaded(name: str, inst: object, *, timeout_s: float = 5, on_error: str = "tempfail",
           requires: tuple[str, ...] = ()) -> LoadedFilter:
    return LoadedFilter(name, inst, (Stage.MESSAGE,), requires, timeout_s, on_error, "test")


CTX = FilterContext(stage=Stage.MESSAGE, qid="Q1", client=Client("192.0.2.1", 25))


def run(p: Pipeline, ctx: FilterContext = CTX):
    return asyncio.run(p.run_stage(Stage.MESSAGE, ctx))


def test_filters_of_one_stage_run_concurrently():
    p = Pipeline([loaded(f"f{i}", Sleepy(f"f{i}", 0.2)) for i in range(5)])
    start = time.monotonic()
    out = run(p)
    elapsed = time.monotonic() - start
    assert list(out) == ["f0", "f1", "f2", "f3", "f4"]
    assert elapsed < 0.6, f"5 x 0.2 s filters took {elapsed:.2f}s: not concurrent"
    assert all(o.error is None for o in out.values())


def test_requires_waits_and_passes_the_result():
    a, b = Sleepy("a", 0.1), Sleepy("b", 0.0, requires=("a",))
    p = Pipeline([loaded("b", b, requires=("a",)), loaded("a", a)])
    out = run(p)
    assert "a" in b.seen and b.seen["a"].symbols == (Symbol("A"),)
    assert out["b"].result.data["done"] >= out["a"].result.data["done"]
    assert list(out) == ["b", "a"]  # outcomes keep chain order


def test_independent_filters_see_the_earlier_stages_results_only():
    """Filters that require none of their stage's see the results the stage started with
    (one shared snapshot), whatever finishes before they start; a dependent sees its
    requirement's result on top."""
    earlier = {"spf": Result(symbols=(Symbol("SPF_PASS"),))}
    fast, slow = Sleepy("fast", 0.0), Sleepy("slow", 0.05)
    late = Sleepy("late", 0.0)
    dep = Sleepy("dep", 0.0, requires=("fast",))
    p = Pipeline([loaded("fast", fast), loaded("dep", dep, requires=("fast",)),
                  loaded("slow", slow), loaded("late", late)])
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q1", client=Client("192.0.2.1", 25),
                        results=earlier)
    out = run(p, ctx)
    assert fast.seen == slow.seen == late.seen == earlier
    assert set(dep.seen) == {"spf", "fast"}
    assert list(out) == ["fast", "dep", "slow", "late"]
    assert dict(ctx.results) == earlier  # the caller's mapping is not written to


@pytest.mark.parametrize("on_error,action", [("tempfail", Action.TEMPFAIL),
                                             ("reject", Action.REJECT),
                                             ("quarantine", Action.QUARANTINE),
                                             ("continue", None)])
def test_timeout_applies_on_error(on_error, action):
    p = Pipeline([loaded("slow", Sleepy("slow", 5), timeout_s=0.1, on_error=on_error)])
    start = time.monotonic()
    out = run(p)["slow"]
    assert time.monotonic() - start < 1
    assert out.error == "timeout"
    assert out.result.symbols == (Symbol("SLOW_ERROR", ("timeout",)),)
    assert (out.result.verdict.action if out.result.verdict else None) is action


def test_exception_becomes_error_symbol_and_verdict():
    out = run(Pipeline([loaded("boom", Boom())]))["boom"]
    assert out.error == "ValueError: secret detail"
    assert out.result.symbols == (Symbol("BOOM_ERROR", ("error",)),)
    assert out.result.verdict is not None and out.result.verdict.action is Action.TEMPFAIL
    assert out.result.verdict.reply is not None
    assert "secret" not in out.result.verdict.reply.render()


def test_a_hook_returning_something_else_is_an_error():
    out = run(Pipeline([loaded("bad", NotAResult(), on_error="continue")]))["bad"]
    assert out.error is not None and out.error.startswith("TypeError")
    assert out.result.verdict is None


def test_skip_and_stage_selection():
    p = Pipeline([loaded("a", Sleepy("a", 0)), loaded("b", Sleepy("b", 0))])
    out = asyncio.run(p.run_stage(Stage.MESSAGE, CTX, skip=frozenset({"a"})))
    assert list(out) == ["b"]
    assert asyncio.run(p.run_stage(Stage.RCPT, CTX)) == {}
