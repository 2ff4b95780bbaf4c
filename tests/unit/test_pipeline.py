"""The pipeline: concurrency within a stage, requires ordering, timeouts and on_error."""

from __future__ import annotations

import asyncio
import dataclasses
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


class Kept(Sleepy):
    """Also looks at its context's results again when it is done."""

    async def on_message(self, ctx: FilterContext) -> Result:
        result = await super().on_message(ctx)
        self.seen_at_end = dict(ctx.results)
        return result


def test_independent_filters_see_the_earlier_stages_results_only():
    """Filters that require none of their stage's see the results the stage started with
    (one shared snapshot), whatever finishes before they start; a dependent sees its
    requirement's result on top."""
    earlier = {"spf": Result(symbols=(Symbol("SPF_PASS"),))}
    fast, slow = Sleepy("fast", 0.0), Kept("slow", 0.05)
    late = Sleepy("late", 0.0)
    dep = Sleepy("dep", 0.0, requires=("fast",))
    p = Pipeline([loaded("fast", fast), loaded("dep", dep, requires=("fast",)),
                  loaded("slow", slow), loaded("late", late)])
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q1", client=Client("192.0.2.1", 25),
                        results=earlier)
    out = run(p, ctx)
    assert fast.seen == slow.seen == late.seen == earlier
    assert slow.seen_at_end == earlier  # its snapshot did not change while dep got "fast"
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
    # what the engine asks before building a stage's context
    assert p.has(Stage.MESSAGE) and not p.has(Stage.RCPT) and not p.has(Stage.CONNECT)


def test_a_lone_filter_sees_the_stage_it_runs_at():
    """One filter at a stage runs on the caller's context, re-staged if it was made for
    another stage."""
    seen: list[Stage] = []

    class Stages(Sleepy):
        async def on_message(self, ctx):
            seen.append(ctx.stage)
            return await super().on_message(ctx)

    p = Pipeline([loaded("s", Stages("s", 0))])
    assert list(asyncio.run(p.run_stage(Stage.MESSAGE, dataclasses.replace(CTX, stage=Stage.RCPT))))
    assert seen == [Stage.MESSAGE]


class Where(Sleepy):
    """Records the task its hook ran in."""

    def __init__(self, name: str, delay: float, requires: tuple[str, ...] = ()) -> None:
        super().__init__(name, delay, requires)
        self.task: asyncio.Task[object] | None = None

    async def on_message(self, ctx: FilterContext) -> Result:
        self.task = asyncio.current_task()
        return await super().on_message(ctx)


def local(name: str, inst: object, **kw: object) -> LoadedFilter:
    return dataclasses.replace(loaded(name, inst, **kw), local=True)  # type: ignore[arg-type]


def test_local_filters_run_in_the_stage_coroutine_concurrently_with_the_others():
    a, b, net = Where("a", 0.2), Where("b", 0.0), Where("net", 0.2)
    p = Pipeline([local("a", a), loaded("net", net), local("b", b)])

    async def main() -> tuple[dict[str, object], asyncio.Task[object] | None, float]:
        start = time.monotonic()
        out = await p.run_stage(Stage.MESSAGE, CTX)
        return out, asyncio.current_task(), time.monotonic() - start

    out, caller, elapsed = asyncio.run(main())
    assert a.task is caller and b.task is caller  # no task of their own
    assert net.task is not caller and net.task is not None
    assert net.task.get_name() == "filter:net:message"
    assert elapsed < 0.35, f"local 0.2 s and task 0.2 s took {elapsed:.2f}s: not concurrent"
    assert list(out) == ["a", "net", "b"]  # chain order, as always


def test_a_local_filter_others_wait_for_or_that_waits_keeps_its_task():
    a = Where("a", 0.05)
    dep = Where("dep", 0.0, requires=("a",))
    p = Pipeline([local("a", a), local("dep", dep, requires=("a",))])

    async def main() -> asyncio.Task[object] | None:
        await p.run_stage(Stage.MESSAGE, CTX)
        return asyncio.current_task()

    caller = asyncio.run(main())
    assert a.task is not caller and dep.task is not caller
    assert "a" in dep.seen and dep.seen["a"].symbols == (Symbol("A"),)


def test_cancelled_while_a_local_filter_runs_cancels_the_started_tasks():
    slow, net = Where("slow", 5), Where("net", 5)
    p = Pipeline([local("slow", slow), loaded("net", net)])

    async def main() -> None:
        stage = asyncio.ensure_future(p.run_stage(Stage.MESSAGE, CTX))
        await asyncio.sleep(0.05)
        stage.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stage
        await asyncio.sleep(0)
        assert net.task is not None and net.task.cancelled()

    asyncio.run(main())


def test_the_registry_reads_local_from_the_filter():
    from gateway.filterapi import is_local

    class Plain:
        local = "example.test"  # an unrelated attribute of that name is not the flag

    class Flagged:
        local = True

    assert is_local(Flagged()) and not is_local(Plain()) and not is_local(object())
