"""CheckGate: at most ``limit`` holders; a waiter gives up after ``wait_s`` and goes in without a
slot; no slot is lost to a timeout or a cancelled waiter."""

from __future__ import annotations

import asyncio

from gateway.checkgate import CheckGate


async def hold(gate: CheckGate, seconds: float, log: list[tuple[str, float]], name: str) -> float:
    async with gate.slot() as waited:
        log.append((name, waited))
        await asyncio.sleep(seconds)
    return waited


def test_at_most_limit_hold_a_slot_and_the_rest_wait_their_turn():
    async def main() -> tuple[list[float], int]:
        gate = CheckGate(2, wait_s=5)
        running = peak = 0

        async def one() -> float:
            nonlocal running, peak
            async with gate.slot() as waited:
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.05)
                running -= 1
            return waited
        waits = await asyncio.gather(*(one() for _ in range(5)))
        return sorted(waits), peak
    waits, peak = asyncio.run(main())
    assert peak == 2
    assert waits[:2] == [0.0, 0.0]
    assert all(w >= 0.04 for w in waits[2:])  # they waited for a slot to come free


def test_a_waiter_past_wait_s_runs_without_a_slot_and_slots_are_not_lost():
    async def main() -> tuple[float, int, float]:
        gate = CheckGate(1, wait_s=0.05)
        log: list[tuple[str, float]] = []
        first = asyncio.create_task(hold(gate, 0.3, log, "first"))
        await asyncio.sleep(0.01)
        second = await hold(gate, 0.0, log, "second")  # gives up after 0.05 s, runs anyway
        assert not first.done()  # ...while the first still holds the only slot
        await first
        third = await hold(gate, 0.0, log, "third")  # the slot is free again
        return second, gate.overflows, third
    second, overflows, third = asyncio.run(main())
    assert 0.04 <= second < 0.25
    assert overflows == 1
    assert third == 0.0


def test_a_cancelled_waiter_takes_no_slot_with_it():
    async def main() -> float:
        gate = CheckGate(1, wait_s=5)
        log: list[tuple[str, float]] = []
        first = asyncio.create_task(hold(gate, 0.1, log, "first"))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(hold(gate, 0.0, log, "cancelled"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(first, waiter, return_exceptions=True)
        assert waiter.cancelled() and [n for n, _ in log] == ["first"]
        return await hold(gate, 0.0, log, "after")
    assert asyncio.run(main()) == 0.0


def test_no_limit_never_waits():
    async def main() -> list[float]:
        gate = CheckGate(None, wait_s=0.01)
        log: list[tuple[str, float]] = []
        return await asyncio.gather(*(hold(gate, 0.05, log, str(i)) for i in range(50)))
    assert asyncio.run(main()) == [0.0] * 50
