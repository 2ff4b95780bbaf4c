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


class _SlowQuit:
    """A stand-in idle client whose QUIT takes a while (a slow or dead downstream)."""

    def __init__(self) -> None:
        self.closed = False
        self.peer_closed = False
        self.quits = 0

    async def quit(self) -> None:
        self.quits += 1
        await asyncio.sleep(0.2)
        self.closed = True

    def close(self) -> None:
        self.closed = True


def test_reaping_never_hands_out_a_connection_it_is_closing() -> None:
    """While _reap awaits the QUIT of an expired connection, another delivery must not get
    that connection from the idle list, and connections parked meanwhile must stay."""
    from gateway.relay.pool import _Idle

    t = Transport("smtp", host="127.0.0.1", port=9)

    async def go() -> tuple[object, list[object], int]:
        pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=2, idle_s=1.0)
        old = _SlowQuit()
        pool._idle[t] = [_Idle(old, since=0.0)]  # long expired
        reaping = asyncio.create_task(pool._reap())
        await asyncio.sleep(0.05)  # _reap is inside old.quit()
        taken = await pool._reuse(t)  # must not be the connection being closed
        fresh = _SlowQuit()
        pool._idle.setdefault(t, []).append(_Idle(fresh))  # parked during the reap
        await reaping
        return taken, [i.client for i in pool._idle.get(t, [])], old.quits

    taken, idle, quits = asyncio.run(go())
    assert taken is None and quits == 1
    assert len(idle) == 1 and isinstance(idle[0], _SlowQuit) and idle[0].quits == 0


def test_an_open_transaction_is_reset_before_parking_a_finished_one_is_not() -> None:
    """After the reply to the end of data the session is ready for the next MAIL (RFC 5321
    4.1.1.4): no RSET round trip. A MAIL whose recipients were all refused leaves the
    transaction open: that connection is RSET before it is parked."""
    with Sink(replies={"RCPT:nobody@example.test": "550 5.1.1 no such user"}) as sink:
        t = Transport("smtp", host="127.0.0.1", port=sink.port)

        async def go() -> tuple[list[str], list[str]]:
            pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=1, idle_s=5)
            async with pool.session(t) as c:
                mail, rcpts = await c.envelope("a@sender.test", [], [("r@example.test", [])])
                assert mail.is_ok and rcpts[0].is_ok
                (done,) = await c.data([b"Subject: one\r\n\r\nbody\r\n"])
                assert done.is_ok and not c.in_transaction
            after_data = list(sink.commands)
            async with pool.session(t) as c:
                mail, rcpts = await c.envelope("a@sender.test", [],
                                               [("nobody@example.test", [])])
                assert mail.is_ok and rcpts[0].code == 550 and c.in_transaction
            after_refusal = list(sink.commands)
            async with pool.session(t) as c:  # the same connection, clean again
                mail, _ = await c.envelope("a@sender.test", [], [("r@example.test", [])])
                assert mail.is_ok
                await c.data([b"Subject: two\r\n\r\nbody\r\n"])
            await pool.close()
            return after_data, after_refusal

        after_data, after_refusal = asyncio.run(go())
    verbs = [c.split()[0].upper() for c in after_data]
    assert "RSET" not in verbs, after_data
    assert [c.split()[0].upper() for c in after_refusal][-1] == "RSET", after_refusal
    assert sink.connections == 1 and len(sink.messages) == 2
