"""How many messages go through their end-of-DATA checks at once, per worker.

The checks of a message (parsing it, the message-stage filters, the decision and, in queue mode,
its commit to the queue) hold its parsed views, its filters' state and their results; a
message waiting for its turn holds only its spool file. ``limits.max_concurrent_checks``
bounds how many run at once, so memory stays bounded when many sessions end their DATA together
(bench/run.py, the full chain at 200 sessions: peak RSS 50.5-51.9 → 46.6-46.8 MB, msgs/s
−1 to −5%, in three alternating pairs). The filters' CPU work runs on one event loop anyway;
what the limit holds back is only how many messages are half done at once. A policy without
message-stage filters gets no limit: there is little to bound, and queue mode's commits batch
their fsyncs better the more of them wait together.

A message waits at most ``limits.check_wait_s`` for a slot, then runs anyway: when the checks
are slow because they wait (a DNS outage stalls every lookup until its timeout), a queue behind
them would only add that wait to every message, and could push messages past
``command_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class CheckGate:
    def __init__(self, limit: int | None, wait_s: float) -> None:
        """``limit`` None: no limit (a policy without message-stage filters: their memory is
        what the gate bounds, and queue mode's commits batch their fsyncs better unlimited)."""
        self._slots = asyncio.Semaphore(limit) if limit is not None else None
        self.wait_s = wait_s
        self.overflows = 0  # messages that ran without a slot: they waited wait_s in vain

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Holds a slot for the body of the ``async with``; yields the seconds waited for it.
        After ``wait_s`` without one, the body runs without a slot."""
        slots = self._slots
        if slots is None:
            yield 0.0
            return
        if not slots.locked():
            await slots.acquire()  # free: returns without waiting
            held, waited = True, 0.0
        else:
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(self.wait_s):
                    await slots.acquire()
                held = True
            except TimeoutError:
                held = False
                self.overflows += 1
            waited = time.monotonic() - t0
        try:
            yield waited
        finally:
            if held:
                slots.release()
