"""Background tasks that never die silently: the one place that runs the gateway's long-lived
tasks (the queue manager's loop, the pools' reapers, quarantine expiry, the fsync writer) and
reports the failures of one-shot ones (``on_decided`` hooks such as Bayes auto-learn, the
runtime's background chores).

``start(name, body)`` runs ``await body()`` in a task until it returns normally (its job is
done, or it was told to stop) or the task is cancelled. An exception from ``body`` is logged
once, with its traceback (a repeat of the same failure in a row gets one short line instead
of the traceback again; a run that returned or lasted HEALTHY_AFTER_S ends the row), counted in ``FAILURES[name]``, and ``body`` runs again after a
capped exponential backoff: MIN_BACKOFF_S, doubled after each failure up to MAX_BACKOFF_S, back
to MIN_BACKOFF_S once a run lasted HEALTHY_AFTER_S. Without this an exception ended the task
and was only seen as asyncio's "Task exception was never retrieved", if ever, and the work it
did (reaping idle connections, delivering the queue) silently stopped.

``FAILURES`` (task name -> exceptions seen in this process) is what a metrics endpoint
exports; ``report`` counts and logs a failure of a task that is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable

log = logging.getLogger("mailgate.supervise")

MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
HEALTHY_AFTER_S = 60.0  # a run this long resets the backoff

FAILURES: Counter[str] = Counter()  # task name -> exceptions seen (restarted or not)
_last: dict[str, str] = {}  # task name -> the signature of its last failure (see _signature)
_running: set[asyncio.Task[None]] = set()  # strong references: a task is never collected


def report(name: str, exc: BaseException, *, restart_in_s: float | None = None,
           context: str = "") -> None:
    """Count a failure of ``name`` and log it: with its traceback, unless it is the same
    failure (type, message, place) as the one before it for this name. ``context``: what it
    was doing (e.g. the qid), for the log line."""
    FAILURES[name] += 1
    sig = _signature(exc)
    again = _last.get(name) == sig
    _last[name] = sig
    then = "" if restart_in_s is None else f"; restarting in {restart_in_s:g}s"
    where = f" ({context})" if context else ""
    if again:
        log.error("background task %s failed again%s: %s: %s (%d failures)%s", name, where,
                  type(exc).__name__, exc, FAILURES[name], then)
    else:
        log.error("background task %s failed%s (%d failures)%s", name, where, FAILURES[name],
                  then, exc_info=(type(exc), exc, exc.__traceback__))


def succeeded(name: str) -> None:
    """``name`` did its job since its last failure: the next failure is logged with its
    traceback again, not as a repeat."""
    _last.pop(name, None)


def _signature(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__qualname__}: {exc} @ {where}"


async def supervised(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` until it returns; after an exception log, count, wait, run it again."""
    loop = asyncio.get_running_loop()
    backoff = MIN_BACKOFF_S
    while True:
        began = loop.time()
        try:
            await body()
            succeeded(name)
            return
        except Exception as e:  # CancelledError (a BaseException) ends the task
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # cancelled, and the body's clean-up raised something else instead: report
                # it, but end as cancelled (restarting would swallow the cancellation, and a
                # loop shutting down would wait for this task for ever)
                report(name, e)
                raise asyncio.CancelledError from e
            if loop.time() - began >= HEALTHY_AFTER_S:
                backoff = MIN_BACKOFF_S
                succeeded(name)  # it did its job meanwhile: this failure is news
            report(name, e, restart_in_s=backoff)
        await asyncio.sleep(backoff)
        backoff = min(MAX_BACKOFF_S, backoff * 2)


def start(name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """``supervised(name, body)`` in a task of the running loop, referenced until it ends."""
    task = asyncio.get_running_loop().create_task(supervised(name, body), name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


def watch(task: asyncio.Task[object], name: str) -> None:
    """Report ``task``'s exception, if it ends with one (a one-shot task, not restarted)."""
    task.add_done_callback(lambda t: _done(t, name))


def _done(task: asyncio.Task[object], name: str) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        report(name, exc)
