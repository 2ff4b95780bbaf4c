"""The filter contract's header edits: AddHeader refuses a name that is not an RFC 5322 field
name, and a filter that builds such an edit fails like any filter that raises (on_error)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.filterapi import (
    Action,
    AddHeader,
    Client,
    FilterContext,
    RemoveHeader,
    Result,
    Stage,
    Symbol,
)
from gateway.pipeline import Pipeline
from gateway.registry import LoadedFilter

BAD_NAMES = ["X-Bad\r\nBcc: victim@example.test", "X-Bad\n", "X-Bad\r", "X-Bad:", "X:Bad",
             "X Bad", "X-Bad ", " X-Bad", "X-Bad\t", "", "X-B\u00e4d", "X-Bad\x00", "X-Bad\x7f"]


@pytest.mark.parametrize("name", ["X-Ok", "X-Spam-Status", "x_lower.case!#$%&'*+/=?^`{|}~",
                                  "A", "X-9"])
def test_add_header_accepts_field_names(name):
    assert AddHeader(name, "value").name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_add_header_refuses_a_bad_name(name):
    with pytest.raises(ValueError, match="not a header field name"):
        AddHeader(name, "value")


def test_remove_header_is_not_checked():  # it only matches names; nothing is written
    assert RemoveHeader("X-Spam-", name_prefix=True).name_prefix


class BadEdit:
    """Builds its AddHeader inside the hook, as filters do: the ValueError is raised there."""

    def __init__(self, name: str) -> None:
        self.header_name = name

    async def on_message(self, ctx: FilterContext) -> Result:
        return Result(symbols=(Symbol("NEVER_SEEN"),),
                      edits=(AddHeader(self.header_name, "v"),))


CTX = FilterContext(stage=Stage.MESSAGE, qid="Q1", client=Client("192.0.2.1", 25))


@pytest.mark.parametrize("on_error,action", [("tempfail", Action.TEMPFAIL),
                                             ("reject", Action.REJECT),
                                             ("quarantine", Action.QUARANTINE),
                                             ("continue", None)])
def test_a_bad_header_name_from_a_filter_is_a_filter_error(on_error, action):
    f = LoadedFilter("badedit", BadEdit("X-Bad: injected"), (Stage.MESSAGE,), (), 5, on_error,
                     "test")
    out = asyncio.run(Pipeline([f]).run_stage(Stage.MESSAGE, CTX))["badedit"]
    assert out.error == "ValueError: not a header field name: 'X-Bad: injected'"
    assert out.result.symbols == (Symbol("BADEDIT_ERROR", ("error",)),)
    assert out.result.edits == ()  # nothing of the failed result survives
    assert (out.result.verdict.action if out.result.verdict else None) is action
    if on_error == "tempfail":
        assert out.result.verdict is not None and out.result.verdict.reply is not None
        assert out.result.verdict.reply.render() == \
            "451 4.3.0 Temporary local problem, try again later"


def test_offload_runs_small_work_on_the_loop_and_big_work_in_a_thread() -> None:
    import asyncio
    import threading

    from gateway.filterapi import INLINE_MAX_BYTES, offload

    def where(x: int) -> tuple[str, int]:
        return threading.current_thread().name, x * 2

    async def main() -> tuple[tuple[str, int], tuple[str, int]]:
        return (await offload(INLINE_MAX_BYTES, where, 1),
                await offload(INLINE_MAX_BYTES + 1, where, 2))

    small, big = asyncio.run(main())
    assert small == (threading.current_thread().name, 2)  # the loop's own thread
    assert big[1] == 4 and big[0] != threading.current_thread().name


def test_offload_runs_big_work_one_call_at_a_time_in_one_thread() -> None:
    """One CPU thread per process (a pool's threads each held a message's working set), the
    caller's context variables visible in it as with ``asyncio.to_thread``."""
    import asyncio
    import contextvars
    import threading
    import time

    from gateway.filterapi import INLINE_MAX_BYTES, offload

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    lock = threading.Lock()
    running: list[int] = []
    peak: list[int] = [0]

    def work(i: int) -> tuple[str, str, int]:
        with lock:
            running.append(i)
            peak[0] = max(peak[0], len(running))
        time.sleep(0.02)  # the GIL is free: a pool would overlap these
        with lock:
            running.remove(i)
        return threading.current_thread().name, var.get(), i

    async def one(i: int) -> tuple[str, str, int]:
        var.set(f"call {i}")
        return await offload(INLINE_MAX_BYTES + 1, work, i)

    async def main() -> list[tuple[str, str, int]]:
        return list(await asyncio.gather(*(one(i) for i in range(6))))

    out = asyncio.run(main())
    assert [(v, i) for _, v, i in out] == [(f"call {i}", i) for i in range(6)]
    assert len({name for name, _, _ in out}) == 1
    assert out[0][0].startswith("mailgate-cpu")
    assert peak[0] == 1


def test_offload_in_a_forked_child_gets_a_thread_of_its_own() -> None:
    """The supervisor forks its workers: a child must not queue work for its parent's CPU
    thread, which does not exist in the child (the call would never return)."""
    import asyncio
    import os
    import threading

    from gateway.filterapi import INLINE_MAX_BYTES, offload

    def name() -> str:
        return threading.current_thread().name

    asyncio.run(offload(INLINE_MAX_BYTES + 1, name))  # the parent's thread exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            out = asyncio.run(asyncio.wait_for(offload(INLINE_MAX_BYTES + 1, name), 5))
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 100).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got.startswith("mailgate-cpu")
