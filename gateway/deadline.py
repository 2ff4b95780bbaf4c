"""``Deadline``: ``asyncio.timeout`` for a connection's successive waits, with one timer.

Every ``asyncio.timeout`` scope pushes a timer into the event loop's heap and cancels it on
exit; the cancelled timer stays in the heap until its time comes or the heap is rebuilt, and
each push and pop compares timers in Python. A session makes a dozen such waits per message
(each command's budget, each downstream reply), so that bookkeeping was several per cent of
the CPU per message. A ``Deadline`` belongs to one connection and is entered by one wait at a
time; it keeps a single timer that, when it fires early (its wait ended and the next one has
a later deadline), re-arms itself for the wait under way instead. Expiry behaves as with
``asyncio.timeout``: the task is cancelled and the scope raises ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """``async with deadline(seconds):`` — like ``asyncio.timeout(seconds)``, reusable, one
    scope at a time (a second ``async with`` while one is open raises RuntimeError; nest
    different ``Deadline`` objects, or ``asyncio.timeout``, instead)."""

    __slots__ = ("_loop", "_timer", "_armed_at", "_task", "_cancelling", "_when", "_delay",
                 "_expired")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0  # when the timer fires (meaningful while _timer is set)
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._when: float | None = None  # the open scope's deadline; None: no scope open
        self._delay = 0.0
        self._expired = False

    def __call__(self, delay_s: float) -> Deadline:
        if self._when is not None:
            raise RuntimeError("Deadline is already entered")
        self._delay = delay_s
        return self

    async def __aenter__(self) -> Deadline:
        if self._when is not None:
            raise RuntimeError("Deadline is already entered")
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline should be used inside a task")
        when = self._loop.time() + self._delay
        self._task, self._cancelling, self._when, self._expired = (task, task.cancelling(),
                                                                   when, False)
        timer = self._timer
        if timer is None or self._armed_at > when:
            if timer is not None:
                timer.cancel()
            self._arm(when)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        task, self._task, self._when = self._task, None, None
        if self._expired:
            assert task is not None
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expired(self) -> bool:
        """Did the deadline of the scope open now, or else of the last one, pass?"""
        return self._expired

    def close(self) -> None:
        """Drop the timer (the connection is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self._armed_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        when = self._when
        if when is None or self._expired:
            return  # no wait under way (the next scope arms a timer), or it expired already
        if self._loop.time() >= when:
            self._expired = True
            assert self._task is not None
            self._task.cancel()
        else:
            self._arm(when)
