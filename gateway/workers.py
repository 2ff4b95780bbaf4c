"""Several worker processes: the supervisor forks N workers that share the listening sockets
(the kernel spreads connections over them) and the spool (claims keep deliveries exclusive). It
forwards SIGTERM/SIGINT/SIGHUP to them, restarts a worker that dies unexpectedly, and exits when
all have stopped. A worker whose supervisor dies (kill -9) gets SIGTERM and drains."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from gateway.logs import event

log = logging.getLogger("mailgate.workers")
PR_SET_PDEATHSIG = 1
RESTART_PAUSE_S = 1.0
# A worker that exits 1 this soon after it was forked failed to start (the policy file, as it
# is now, does not load): its restarts back off, doubling up to MAX_RESTART_PAUSE_S, rather
# than rebuilding the engine and logging the same errors every second until the file is fixed.
STARTUP_S = 30.0
MAX_RESTART_PAUSE_S = 60.0


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux only; elsewhere workers outlive a kill -9
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(worker: int, main: Callable[[int], int]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        code = main(worker)
    except BaseException:
        log.exception("worker %d crashed", worker)
    finally:
        sys.stderr.flush()
        os._exit(code)


def supervise(n: int, main: Callable[[int], int],
              reload_ok: Callable[[], bool] | None = None) -> int:
    """``reload_ok``: asked on SIGHUP before it is forwarded; False (the new policy is invalid,
    and it said so, once) keeps the workers on the policy they have, without N copies of the
    same ``reload-failed`` line."""
    children: dict[int, int] = {}
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        if sig == signal.SIGHUP and reload_ok is not None and not reload_ok():
            return
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    started: dict[int, float] = {}  # pid -> when it was forked (monotonic)
    failed_starts: dict[int, int] = {}  # worker -> failed starts in a row
    for i in range(n):
        pid = _spawn(i, main)
        children[pid], started[pid] = i, time.monotonic()
    event(log, "workers", count=n, pids=sorted(children))
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker = children.pop(pid, None)
        if worker is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        lived = time.monotonic() - started.pop(pid, 0.0)
        if not stopping:
            failed = code == 1 and lived < STARTUP_S
            failed_starts[worker] = failed_starts.get(worker, 0) + 1 if failed else 0
            pause = min(RESTART_PAUSE_S * 2 ** failed_starts[worker], MAX_RESTART_PAUSE_S)
            event(log, "worker-died", level=logging.ERROR, worker=worker, pid=pid, code=code,
                  restart_in_s=pause)
            deadline = time.monotonic() + pause
            while not stopping and (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.1))  # a SIGTERM meanwhile: no restart, a prompt stop
            if not stopping:
                new = _spawn(worker, main)
                children[new], started[new] = worker, time.monotonic()
                event(log, "worker-restarted", worker=worker, pid=new)
    event(log, "stopped", workers=n)
    return 0
