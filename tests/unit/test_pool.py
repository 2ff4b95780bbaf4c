"""The downstream connection pool: per-destination state is dropped when unused, idle
connections are reaped for every destination, and a closed pool parks nothing."""

from __future__ import annotations

import asyncio

from gateway.policy.schema import RelayConfig
from gateway.relay.pool import DownstreamPool
from gateway.relay.transport import Transport
from tests.support.sink import Sink


def test_state_is_dropped_and_idle_connections_are_reaped() -> None:
    with Sink() as a, Sink() as b:
        ta = Transport("smtp", host="127.0.0.1", port=a.port)
        tb = Transport("smtp", host="127.0.0.1", port=b.port)

        async def go() -> tuple[int, int, int, int]:
            pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=2, idle_s=0.2)
            async with pool.session(ta):
                pass
            async with pool.session(tb):
                pass
            sems_after = len(pool._sems)
            idle_after = sum(len(v) for v in pool._idle.values())
            await asyncio.sleep(0.3)
            async with pool.session(tb):  # reaps a's idle connection too
                pass
            reaped = sum(len(v) for v in pool._idle.values())
            await pool.close()
            async with pool.session(ta):  # a closed pool closes, never parks
                pass
            return sems_after, idle_after, reaped, sum(len(v) for v in pool._idle.values())

        sems, idle, after_reap, after_close = asyncio.run(go())
    assert sems == 0          # no semaphore kept for destinations nobody uses
    assert idle == 2          # both connections parked for reuse
    assert after_reap == 1    # a's expired connection closed; b's fresh one parked
    assert after_close == 0
    assert a.connections == 2 and b.connections == 2
