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
