"""The downstream connection pool: per-destination state is dropped when unused, idle
connections are reaped for every destination, and a closed pool parks nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from gateway import supervise
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


async def _until(cond: Callable[[], bool], timeout_s: float = 8.0) -> bool:
    """Poll ``cond`` (generous deadline: the machine is shared) until true; its last value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def _quits(sink: Sink) -> int:
    return sum(c.upper() == "QUIT" for c in sink.commands)


def test_the_reaper_survives_a_destination_emptied_while_it_reaps() -> None:
    """Issue 25: the reaper task died with ``min() arg is an empty sequence`` (seen only as
    "Task exception was never retrieved") when, while it awaited the QUIT of an expired
    connection, a delivery took the last idle connection of another destination: that list
    stayed in the idle map, empty, and re-arming took the min over no connections."""
    with Sink(delay_s=1.5, delay_on=["QUIT"]) as sa, Sink() as sb:
        ta, tb = (Transport("smtp", host="127.0.0.1", port=s.port) for s in (sa, sb))

        async def go() -> tuple[bool, BaseException | None, bool, bool, int]:
            failures = supervise.FAILURES["pool-reaper"]
            pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=2, idle_s=2.0)
            await pool.release(ta, (await pool.acquire(ta))[0])
            await asyncio.sleep(1.0)
            await pool.release(tb, (await pool.acquire(tb))[0])
            # at ~2 s a is due: the reaper sends its QUIT, answered 1.5 s later
            quitting = await _until(lambda: _quits(sa) == 1 and len(pool._reaping) == 1)
            (reaper,) = pool._reaping
            b, reused = await pool.acquire(tb)  # the last idle one, during that QUIT
            emptied = tb not in pool._idle
            await asyncio.wait({reaper}, timeout=10)
            error = reaper.exception() if reaper.done() else TimeoutError("reaper hangs")
            await pool.release(tb, b)  # parked again: reaped once idle_s has passed
            reaped = await _until(lambda: _quits(sb) == 1)
            await pool.close()
            return (quitting and reused, error, emptied, reaped,
                    supervise.FAILURES["pool-reaper"] - failures)

        during_quit, error, emptied, reaped, failed = asyncio.run(go())
    assert during_quit  # the scenario happened as described
    assert error is None  # old code: ValueError('min() arg is an empty sequence')
    assert emptied  # no empty list is kept in the idle map
    assert reaped and failed == 0


def test_a_failing_reaper_is_logged_counted_and_runs_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """An exception in the reaping is logged once with its traceback, counted under the
    pool's name, and the reaper runs again (supervise.py): the idle connection is closed."""
    caplog.set_level(logging.ERROR)
    with Sink() as sink:
        t = Transport("smtp", host="127.0.0.1", port=sink.port)

        async def go() -> tuple[bool, int]:
            failures = supervise.FAILURES["proxy-pool-reaper"]
            pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=2, idle_s=0.3,
                                  name="proxy-pool")
            await pool.release(t, (await pool.acquire(t))[0])
            real, calls = pool._reap, []

            async def reap_failing_once() -> None:
                calls.append(1)
                if len(calls) == 1:
                    raise RuntimeError("injected reaper failure")
                await real()

            pool._reap = reap_failing_once  # type: ignore[method-assign]
            reaped = await _until(lambda: _quits(sink) == 1)
            await pool.close()
            return reaped, supervise.FAILURES["proxy-pool-reaper"] - failures

        reaped, failed = asyncio.run(go())
    assert reaped and failed == 1
    logged = [r for r in caplog.records if r.exc_info and "injected reaper failure"
              in str(r.exc_info[1])]
    assert len(logged) == 1 and "proxy-pool-reaper" in logged[0].getMessage()
    assert "Task exception was never retrieved" not in caplog.text


class _Parked:
    """A stand-in idle client: parked as is (no transaction open), closed by QUIT."""

    def __init__(self) -> None:
        self.closed = False
        self.peer_closed = False
        self.in_transaction = False

    async def quit(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


def test_a_reaper_failing_every_time_is_one_task_backing_off(
        caplog: pytest.LogCaptureFixture) -> None:
    """A reaping that fails at every run stays one task, retried with supervise's capped
    backoff, and is logged with its traceback once. The old reaper re-armed its timer after
    a failure as well: every REAP_SLACK_S a new task started, failing in turn, while the
    old ones kept retrying (after 1.2 s: ~25 tasks, ~45 failures and as many log lines)."""
    caplog.set_level(logging.ERROR)
    t = Transport("smtp", host="127.0.0.1", port=9)

    async def go() -> tuple[int, int, bool, bool, int]:
        name = "failing-pool-reaper"
        before = supervise.FAILURES[name]
        pool = DownstreamPool(RelayConfig(), "mx.test", max_per_destination=2, idle_s=0.1,
                              name="failing-pool")
        real = pool._reap

        async def reap_failing() -> None:
            raise RuntimeError("injected reaper failure, every time")

        pool._reap = reap_failing  # type: ignore[method-assign]
        parked = _Parked()
        await pool.release(t, parked)  # type: ignore[arg-type]
        await asyncio.sleep(1.2)
        tasks = sum(not x.done() for x in asyncio.all_tasks() if x.get_name() == name)
        failures = supervise.FAILURES[name] - before
        pool._reap = real  # type: ignore[method-assign]
        reaped = await _until(lambda: parked.closed)  # the retry after the backoff reaps
        ended = await _until(lambda: not any(x.get_name() == name
                                             for x in asyncio.all_tasks()))
        await pool.close()
        return tasks, failures, reaped, ended, supervise.FAILURES[name] - before

    tasks, failures, reaped, ended, total = asyncio.run(go())
    assert tasks == 1  # old code: ~25
    assert 1 <= failures <= 6, failures  # backoff 0.1, 0.2, 0.4, 0.8 s; old code: ~45
    assert reaped and ended and total == failures
    logged = [r for r in caplog.records if "failing-pool-reaper" in r.getMessage()]
    assert len(logged) == failures and sum(r.exc_info is not None for r in logged) == 1
