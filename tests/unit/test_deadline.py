"""gateway.deadline.Deadline: asyncio.timeout's behaviour, reusable, with one timer."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.deadline import Deadline


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_expires_like_asyncio_timeout() -> None:
    async def main() -> tuple[float, bool]:
        d = Deadline()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with d(0.05):
                await asyncio.sleep(5)
        return time.monotonic() - t0, d.expired()

    waited, expired_after = run(main())
    assert 0.04 <= waited < 1.0, waited
    assert expired_after is True  # as asyncio.Timeout.expired(): kept until the next scope


def test_a_wait_that_ends_in_time_is_untouched_and_the_object_is_reusable() -> None:
    async def main() -> list[str]:
        d = Deadline()
        out = []
        for i in range(3):
            async with d(1.0):
                await asyncio.sleep(0.01)
                out.append(f"ok{i}")
            out.append(f"expired={d.expired()}")
        with pytest.raises(TimeoutError):
            async with d(0.05):
                await asyncio.sleep(5)
        async with d(1.0):  # usable again after an expiry
            await asyncio.sleep(0.01)
            out.append("after")
        out.append(f"expired={d.expired()}")
        return out

    assert run(main()) == ["ok0", "expired=False", "ok1", "expired=False", "ok2",
                           "expired=False", "after", "expired=False"]


def test_a_shorter_deadline_after_a_longer_one_still_fires_on_time() -> None:
    async def main() -> float:
        d = Deadline()
        async with d(30):  # arms a timer 30 s out
            await asyncio.sleep(0)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with d(0.05):  # must not wait for that timer
                await asyncio.sleep(5)
        return time.monotonic() - t0

    assert run(main()) < 1.0


def test_an_early_timer_rearms_for_the_wait_under_way() -> None:
    """The first scope's timer (0.1 s) fires during the second scope (deadline 0.4 s): the
    second wait is not cut short, and still expires at its own deadline."""
    async def main() -> float:
        d = Deadline()
        async with d(0.1):
            await asyncio.sleep(0)
        t0 = time.monotonic()
        async with d(0.4):
            await asyncio.sleep(0.25)  # past the first timer, before this deadline
        with pytest.raises(TimeoutError):
            async with d(0.3):
                await asyncio.sleep(5)
        return time.monotonic() - t0

    assert 0.5 <= run(main()) < 1.5


def test_one_timer_for_many_waits() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        calls = 0
        call_at = loop.call_at

        def counting(*a, **k):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return call_at(*a, **k)

        loop.call_at = counting  # type: ignore[method-assign]
        d = Deadline()
        for _ in range(200):
            async with d(60):
                await asyncio.sleep(0)
        d.close()
        return calls

    assert run(main()) == 1


def test_an_outside_cancellation_stays_a_cancellation() -> None:
    async def main() -> str:
        d = Deadline()

        async def waiter() -> None:
            async with d(10):
                await asyncio.sleep(5)

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except TimeoutError:
            return "timeout"
        return "finished"

    assert run(main()) == "cancelled"


@pytest.mark.parametrize(("outer_s", "inner_s", "fires"),
                         [(10, 0.05, "inner"), (0.05, 10, "outer")])
def test_nested_with_asyncio_timeout_the_earlier_deadline_fires(outer_s: float, inner_s: float,
                                                                 fires: str) -> None:
    """A Deadline around an asyncio.timeout: the inner scope's expiry is the inner's to
    handle, and the outer's expiry passes through the inner scope as a cancellation."""
    async def main() -> str:
        d = Deadline()
        try:
            async with d(outer_s):
                try:
                    async with asyncio.timeout(inner_s):
                        await asyncio.sleep(5)
                except TimeoutError:
                    return "inner"
        except TimeoutError:
            return "outer"
        return "none"

    assert run(main()) == fires


def test_one_scope_at_a_time() -> None:
    async def main() -> None:
        d = Deadline()
        async with d(1):
            with pytest.raises(RuntimeError, match="already entered"):
                async with d(1):
                    pass

    run(main())
