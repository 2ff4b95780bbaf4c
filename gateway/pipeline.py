"""Run one stage's filters: concurrently, each under its own timeout, ordered by ``requires``/``after``,
with each filter's ``on_error`` applied when it raises or times out.

A failing filter never fails open by accident: the outcome always carries a ``<NAME>_ERROR``
symbol, and ``on_error`` turns it into a verdict (``tempfail``, ``reject``, ``quarantine``) or
lets the message ``continue``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway import supervise
from gateway.edits import raw_field
from gateway.filterapi import (
    Action,
    AddHeader,
    Decided,
    FilterContext,
    Result,
    Stage,
    Symbol,
    Verdict,
)
from gateway.registry import LoadedFilter
from gateway.replies import Reply

log = logging.getLogger("mailgate.pipeline")

ERROR_VERDICTS = {
    "tempfail": Verdict(Action.TEMPFAIL, Reply(451, "4.3.0", "Temporary local problem, "
                                                             "try again later"), "filter error"),
    "reject": Verdict(Action.REJECT, Reply(550, "5.7.0", "Message refused"), "filter error"),
    "quarantine": Verdict(Action.QUARANTINE, None, "filter error"),
}


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    name: str
    stage: Stage
    result: Result
    elapsed_ms: float
    error: str | None = None  # "timeout" or "ExcType: message"; details are in the log


class Pipeline:
    def __init__(self, chain: Iterable[LoadedFilter]) -> None:
        self.chain = tuple(chain)
        self._by_stage = {s: tuple(f for f in self.chain if s in f.stages) for s in Stage}
        # per stage, the order to start tasks in (requirements first) and each task's name
        self._start = {s: tuple((f, f"filter:{f.name}:{s.value}")
                                for f in _ordered(self._by_stage[s])) for s in Stage}
        self.has_signers = any(f.signs for f in self.chain)
        self.has_deciders = any(f.decides for f in self.chain)

    def has(self, stage: Stage) -> bool:
        """Whether any filter runs at ``stage`` (else the caller need not build a context)."""
        return bool(self._by_stage[stage])

    async def run_stage(self, stage: Stage, ctx: FilterContext,
                        skip: frozenset[str] = frozenset(),
                        background: frozenset[str] = frozenset(),
                        pending: dict[str, asyncio.Task[FilterOutcome]] | None = None
                        ) -> dict[str, FilterOutcome]:
        """Run the stage; returns outcomes by filter name (in chain order). Filters named in
        ``background`` are started but not waited for: their tasks go into ``pending`` (the
        caller collects them later, see :func:`collect`), unless a filter of this stage
        requires them (then it waits, as usual)."""
        todo = [f for f in self._by_stage[stage] if f.name not in skip]
        if not todo:
            return {}
        if len(todo) == 1 and not (pending is not None and todo[0].name in background):
            f = todo[0]  # the common case of a stage with one filter: no task, no gather
            fctx = ctx if ctx.stage is stage else dataclasses.replace(ctx, stage=stage)
            return {f.name: await self._call(f, stage, fctx)}
        results = dict(ctx.results)
        tasks: dict[str, asyncio.Task[FilterOutcome]] = {}
        names_here = {f.name for f in todo}
        # one context for the filters that wait for none of this stage's (frozen: shareable)
        first = dataclasses.replace(ctx, stage=stage, results=dict(results))

        async def run(f: LoadedFilter) -> FilterOutcome:
            waits = [tasks[r] for r in f.runs_after if r in names_here and r in tasks]
            if not waits:
                return await self._call(f, stage, first)
            for done in await asyncio.gather(*waits):
                results[done.name] = done.result
            fctx = dataclasses.replace(ctx, stage=stage, results=dict(results))
            return await self._call(f, stage, fctx)

        # Local filters that wait for none of this stage's and that none waits for run here,
        # one after another, once the others' tasks are started: no task of their own.
        needed = {r for f in todo for r in f.runs_after}
        here = [f for f in todo if f.local and f.name not in needed
                and not any(r in names_here for r in f.runs_after)
                and not (pending is not None and f.name in background)]
        inline = {f.name for f in here}
        # Create tasks in dependency order so a dependent can find its requirements' tasks.
        for f, task_name in self._start[stage]:
            if f.name in names_here and f.name not in inline:
                tasks[f.name] = asyncio.create_task(run(f), name=task_name)
        waiting = dict(tasks)  # ``tasks`` stays whole: dependents look their requirements up
        if pending is not None:
            for name in background & tasks.keys():
                pending[name] = waiting.pop(name)
        outcomes: list[FilterOutcome] = []
        try:
            for f in here:
                outcomes.append(await self._call(f, stage, first))
        except BaseException:  # cancelled meanwhile: so are the tasks nobody will gather now
            for task in waiting.values():
                task.cancel()
            raise
        outcomes += await asyncio.gather(*waiting.values())
        by_name = {o.name: o for o in outcomes}
        return {f.name: by_name[f.name] for f in todo if f.name in by_name}

    async def _call(self, f: LoadedFilter, stage: Stage, ctx: FilterContext) -> FilterOutcome:
        start = time.perf_counter()
        hook = getattr(f.instance, stage.hook)
        error: str | None = None
        try:
            async with asyncio.timeout(f.timeout_s):
                result = await hook(ctx)
            if not isinstance(result, Result):
                raise TypeError(f"{stage.hook} returned {type(result).__name__}, not Result")
        except TimeoutError:
            error = "timeout"
            log.warning("filter %s timed out after %.1fs at %s (qid %s)", f.name, f.timeout_s,
                        stage.value, ctx.qid)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.error("filter %s failed at %s (qid %s): %s", f.name, stage.value, ctx.qid,
                      error, exc_info=True)
        elapsed = (time.perf_counter() - start) * 1000
        if error is not None:
            kind = "timeout" if error == "timeout" else "error"
            result = Result(symbols=(Symbol(f"{f.name.upper()}_ERROR", (kind,)),),
                            verdict=_error_verdict(f))
        return FilterOutcome(f.name, stage, result, elapsed, error)


    async def sign(self, ctx: FilterContext, headers: bytes,
                   skip: frozenset[str] = frozenset()) -> tuple[bytes, str | None]:
        """Run the signers (``on_sign``) one after another, in chain order (``requires`` /
        ``after`` respected), each under its ``timeout_s``, each seeing the header block with
        the earlier signers' headers on top. Returns the new header block and ``None``, or the
        block so far and an error text when a signer failed and its ``on_error`` is not
        ``continue`` (the message must then not leave unsigned)."""
        for f in _ordered([f for f in self.chain if f.signs and f.name not in skip]):
            try:
                async with asyncio.timeout(f.timeout_s):
                    added = await f.instance.on_sign(ctx, headers)
                if not all(isinstance(a, AddHeader) for a in added):
                    raise TypeError("on_sign must return a tuple of AddHeader")
            except Exception as e:  # TimeoutError included
                error = "timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                log.error("signer %s failed (qid %s): %s", f.name, ctx.qid, error,
                          exc_info=not isinstance(e, TimeoutError))
                if f.on_error == "continue":
                    continue
                return headers, f"{f.name}: {error}"
            headers = b"".join(raw_field(a.name, a.value) for a in added) + headers
        return headers, None


async def collect(pending: dict[str, asyncio.Task[FilterOutcome]]) -> list[FilterOutcome]:
    """The outcomes of background filters, waited for (each is bounded by its own
    ``timeout_s``). Empties ``pending``."""
    if pending:
        await asyncio.wait(pending.values())
    return take_done(pending)


def take_done(pending: dict[str, asyncio.Task[FilterOutcome]]) -> list[FilterOutcome]:
    """The outcomes of the background filters that are done; the others are cancelled.
    Empties ``pending``."""
    out = []
    for t in pending.values():
        if t.done() and not t.cancelled() and t.exception() is None:
            out.append(t.result())
        else:
            t.cancel()
    pending.clear()
    return out


async def decided(chain: tuple[LoadedFilter, ...], ctx: FilterContext, what: Decided,
                  skip: frozenset[str] = frozenset()) -> None:
    """Tell the filters with ``on_decided`` what was decided, concurrently, each within its
    ``timeout_s``; failures are logged and change nothing."""

    async def one(f: LoadedFilter) -> None:
        try:
            async with asyncio.timeout(f.timeout_s):
                await f.instance.on_decided(ctx, what)
        except TimeoutError:
            log.error("filter %s on_decided failed (qid %s): timeout", f.name, ctx.qid)
        except Exception as e:  # a bug: its traceback, counted (e.g. Bayes auto-learn)
            supervise.report(f"on_decided:{f.name}", e, context=f"qid {ctx.qid}")

    await asyncio.gather(*(one(f) for f in chain if f.decides and f.name not in skip))


def _error_verdict(f: LoadedFilter) -> Verdict | None:
    """What ``on_error`` makes of a failure; a filter class may give its own tempfail reply
    (``error_reply``, e.g. the virus scanner's ``451 4.7.1``, as Postfix answers when a milter
    is unavailable)."""
    verdict = ERROR_VERDICTS.get(f.on_error)
    own = getattr(f.instance, "error_reply", None)
    if verdict is not None and verdict.action is Action.TEMPFAIL and isinstance(own, Reply):
        return Verdict(Action.TEMPFAIL, own, verdict.reason)
    return verdict


def _ordered(chain: Sequence[LoadedFilter]) -> list[LoadedFilter]:
    """Topological order by ``requires`` and ``after`` (cycles are refused at load time)."""
    by_name = {f.name: f for f in chain}
    out: list[LoadedFilter] = []
    seen: set[str] = set()

    def visit(f: LoadedFilter) -> None:
        if f.name in seen:
            return
        seen.add(f.name)
        for r in f.runs_after:
            if r in by_name:
                visit(by_name[r])
        out.append(f)

    for f in chain:
        visit(f)
    return out
