"""Starting the gateway: one process, or a supervisor of worker processes. Kept apart from
``gateway.app`` so that the supervisor never imports the engine, the filters and the SMTP
server, nor builds a filter chain: each worker does that for itself after the fork. A
supervisor that held an engine kept ~15 MB (more with the rules and Bayes) for nothing, and
every worker inherited it, counted again in each one's resident set."""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.cpus import available_cpus
from gateway.errors import PolicyError, StartupError
from gateway.logs import event
from gateway.policy.loader import load_policy
from gateway.policy.schema import Policy
from gateway.preflight import (
    check_tls_files,
    listen_problem,
    lock_spool,
    maildir_problems,
    spool_problem,
)

log = logging.getLogger("mailgate")
LISTEN_BACKLOG = 4096  # asyncio's default of 100 drops connections under load


def raise_fd_limit() -> int:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to its hard limit — the soft
    default (often 1024) is far below what an MTA's connections need — and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def bind_listeners(policy: Policy) -> list[socket.socket]:
    """A listening socket for each of ``server.listen``; StartupError (one line naming the
    address and the reason) if one cannot be bound, the others closed again."""
    out: list[socket.socket] = []
    for lst in policy.listeners:
        family = socket.AF_INET6 if ":" in lst.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((lst.host, lst.port))
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            for s in out:
                s.close()
            raise StartupError(listen_problem(lst.host, lst.port, e)) from None
        sock.setblocking(False)
        out.append(sock)
    return out


def run(policy_path: Path) -> int:
    """Start the gateway: in this process (``server.workers = 1``), or as a supervisor of N
    worker processes sharing the listening sockets and the spool. Once the policy is fully
    validated (filters built, TLS loaded) and before anything listens, it takes the spool's
    lock (one gateway per spool: a second one exits) and binds every address. A policy that
    does not load or an environment that does not fit exits 1, each problem one line, and a
    policy that does not load leaves no trace (no spool created)."""
    try:
        policy = load_policy(policy_path)
    except PolicyError:
        every = _every_problem(policy_path)
        return _problems(every.problems, every.warnings)
    found: list[str] = []  # what the environment lacks, each one line
    try:
        check_tls_files(policy)
    except PolicyError as e:
        found += e.problems
    if problem := spool_problem(policy.spool.directory):
        found.append(problem)
    found += maildir_problems(policy)
    if found:
        rest = _every_problem(policy_path, environment=False)  # the filters' too, at once
        return _problems([*found, *(p for p in rest.problems if p not in found)],
                         rest.warnings)
    raise_fd_limit()  # before forking: the workers inherit it
    workers = policy.workers or available_cpus()  # a container's CPU quota, not the host's
    locks: list[int] = []
    try:
        if workers == 1:
            def prepare(valid: Policy) -> list[socket.socket]:
                locks.append(lock_spool(valid.spool.directory))
                return bind_listeners(valid)

            return _worker(policy_path, None, 0, recover=True, prepare=prepare)
        code = _in_child(policy_path, _build_engine)
        if code:
            return code
        locks.append(lock_spool(policy.spool.directory))
        sockets = bind_listeners(policy)
        code = _in_child(policy_path, lambda _: _recover_spool(policy.spool.directory))
        if code:
            return code
        from gateway.workers import supervise

        return supervise(workers, lambda i: _worker(policy_path, sockets, i),
                         reload_ok=lambda: _reload_check(policy_path))
    except StartupError as e:
        return _problems([str(e)])
    finally:
        for fd in locks:  # held to the end: in the workers too, by inheritance
            os.close(fd)


def _worker(policy_path: Path, sockets: list[socket.socket] | None, worker: int, *,
            recover: bool = False,
            prepare: Callable[[Policy], list[socket.socket]] | None = None) -> int:
    """One gateway process on the listening ``sockets`` (or those ``prepare`` returns once the
    policy is validated); ``recover``: it also recovers the spool (one process alone). It
    builds the filter chain itself; a policy error there exits 1."""
    import asyncio

    from gateway.app import serve

    return asyncio.run(serve(policy_path, sockets, recover=recover, worker=worker,
                             prepare=prepare))


def _build_engine(policy_path: Path) -> None:
    """Build the whole engine (filters, rule sets, Bayes, TLS) once: a policy that cannot run
    fails before the spool is touched."""
    from gateway.app import load_checked

    load_checked(policy_path)


def _reload_check(policy_path: Path) -> bool:
    """SIGHUP in the supervisor: is the policy file valid now (checked in a forked child, as
    at start)? If not, the child logs one ``reload-failed`` line naming every problem, and the
    signal is not forwarded: each worker would log the same line."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from gateway.app import load_checked

            engine, _ = load_checked(policy_path)
            if maildirs := maildir_problems(engine.policy):
                raise PolicyError(maildirs)
            code = 0
        except PolicyError as e:
            event(log, "reload-failed", level=logging.ERROR, policy=str(policy_path),
                  errors=list(e.problems), kept="previous policy")
        except BaseException:
            log.exception("reload check failed")
        finally:
            sys.stderr.flush()
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped elsewhere: let the workers check it themselves
        return True
    return os.waitstatus_to_exitcode(status) == 0


def _recover_spool(directory: Path) -> None:
    """Recover the spool just locked (the policy is not read again: the directory is the one
    the lock is on; logs its own "spool-recovered" line)."""
    from gateway.app import open_spool

    open_spool(directory).recover()


def _in_child(policy_path: Path, job: Callable[[Path], None]) -> int:
    """Run ``job`` in a forked child, so that this process (the supervisor) never holds an
    engine or a spool; its exit code (1 on a PolicyError or StartupError, each problem one
    line)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            job(policy_path)
            code = 0
        except PolicyError as e:
            code = _problems(e.problems, e.warnings)
        except StartupError as e:
            code = _problems([str(e)])
        except BaseException:
            log.exception("start-up failed")
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _every_problem(policy_path: Path, *, environment: bool = True) -> PolicyError:
    """The policy does not load (or, ``environment=False``, its spool or TLS files do not
    fit, which the caller reports): check it the whole way (the filters' settings, the TLS
    pair and gateway/policy/lint.py too), so one start reports every problem of the file."""
    from gateway.app import load_checked

    try:
        load_checked(policy_path)
    except PolicyError as e:
        return e
    if not environment:
        return PolicyError([])
    try:  # what load_engine does not read (e.g. $MAILGATE_LISTEN)
        load_policy(policy_path)
    except PolicyError as e:
        return e
    raise AssertionError("load_engine accepted a policy that load_policy refused")


def _problems(problems: list[str] | tuple[str, ...], warnings: tuple[str, ...] = ()) -> int:
    """Each problem (then each warning) one log line; exit code 1 (a bad policy or
    environment)."""
    for p in problems:
        log.error("%s", p)
    for w in warnings:
        log.warning("%s", w)
    return 1
