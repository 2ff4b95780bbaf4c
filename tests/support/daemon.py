"""What the helpers that run a real daemon for the tests share (clamd.py, spamd.py, rspamd.py):
a free loopback port, a private temp dir, the daemon process itself (:class:`Daemon`: started,
probed until ready, stopped by its PID) and :func:`once` for one instance a test session shares.

No daemon outlives the test process, even one killed with SIGKILL (no ``atexit``, no
``finally``): each :class:`Daemon` runs in a process group of its own, watched by a tiny reaper
process that holds the read end of a pipe whose write end only the test process has. When that
pipe closes without a ``stop()`` — the test process is gone — the reaper sends SIGTERM to the
daemon's whole process group (its forked workers too, whatever user they switched to: the
reaper runs as the test process's user, root for these daemons), then SIGKILL to what is left
after 10 s. ``stop()`` ends the reaper first, then stops the daemon by its PID.
(PR_SET_PDEATHSIG is no substitute: a process that changes its user, as spamd does, loses it.)
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar

HOST = "127.0.0.1"

# argv[1]: the daemon's process group. Returns when stdin reaches EOF: stop() killed us first,
# or the test process died and took the pipe's write end with it.
_REAPER = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
pgid = int(sys.argv[1])
sys.stdin.buffer.read()
try:
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.1)
        os.killpg(pgid, 0)  # ProcessLookupError once the whole group is gone
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def private_dir(prefix: str) -> Path:
    """A new ``mkdtemp`` dir under /tmp, mode 0755: a daemon that drops to its own user can
    reach it (pytest's 0700 temp dirs it could not); short enough for unix socket paths."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to ``proc`` by its PID and wait for it; SIGKILL if it takes over ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(paths: Iterable[Path], n: int = 30) -> str:
    """The last ``n`` lines of each of ``paths`` that exists, one after the other."""
    lines: list[str] = []
    for p in paths:
        if p.exists():
            lines += p.read_text(errors="replace").splitlines()[-n:]
    return "\n".join(lines)


class Daemon:
    """``argv`` started now, in a new session (its own process group), stdin from /dev/null,
    stdout and stderr appended to ``log``; a reaper ends the group should the test process die
    before :meth:`stop`."""

    def __init__(self, argv: list[str], *, log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)
        try:
            self.reaper: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-c", _REAPER, str(self.proc.pid)], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            stop_process(self.proc, 5)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float,
                   interval_s: float = 0.1) -> str | None:
        """Call ``ready()`` every ``interval_s`` until it is true (None) or the daemon exits or
        ``timeout_s`` passes: then what went wrong (``exited with 1``, ``not ready after 30s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}"
            if ready():
                return None
            time.sleep(interval_s)
        return f"not ready after {timeout_s}s"

    def stop(self, timeout_s: float = 15) -> None:
        """The reaper first (so it cannot signal a reused PID later), then SIGTERM to the daemon
        by its PID (its workers exit with it), SIGKILL after ``timeout_s``."""
        reaper, self.reaper = self.reaper, None
        if reaper is not None:
            reaper.kill()
            reaper.wait()
            assert reaper.stdin is not None
            with contextlib.suppress(OSError):
                reaper.stdin.close()
        stop_process(self.proc, timeout_s)


class PrivateDaemon:
    """Base of a daemon helper that owns a private temp dir (``workdir``, removed by ``stop()``)
    and one :class:`Daemon` started with :meth:`_launch`. Subclasses set ``name`` and
    ``log_names`` (files in ``workdir`` for :meth:`log_tail`) and may override ``_cleanup``."""

    name = "daemon"
    log_names: tuple[str, ...] = ("stdout.log",)

    def __init__(self) -> None:
        self.workdir: Path | None = None
        self.daemon: Daemon | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.daemon.proc if self.daemon is not None else None

    def _launch(self, argv: list[str], ready: Callable[[], bool], timeout_s: float,
                interval_s: float, env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` (output to ``workdir/stdout.log``) and wait until ``ready()``; on
        failure stop everything and raise RuntimeError with the log's tail."""
        assert self.workdir is not None
        self.daemon = Daemon(argv, log=self.workdir / "stdout.log", env=env)
        failure = self.daemon.wait_ready(ready, timeout_s, interval_s)
        if failure is not None:
            log = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} {failure}:\n{log}")

    def log_tail(self, n: int = 30) -> str:
        if self.workdir is None:
            return ""
        return log_tail((self.workdir / name for name in self.log_names), n)

    def _cleanup(self) -> None:
        """After the daemon stopped, before the workdir is removed."""

    def stop(self, timeout_s: float = 15) -> None:
        if self.daemon is not None:
            self.daemon.stop(timeout_s)
        self._cleanup()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


T = TypeVar("T", bound=_Stoppable)


def once(start: Callable[[], T]) -> Callable[[], T]:
    """``shared = once(lambda: X().start())``: ``shared()`` is one instance for the whole test
    process (every test module that needs it shares it), started on first use and stopped when
    the test process exits."""
    instances: list[T] = []

    def shared() -> T:
        if not instances:
            inst = start()
            atexit.register(inst.stop)
            instances.append(inst)
        return instances[0]

    return shared
