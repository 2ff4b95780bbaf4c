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
from pathlib import Path

from gateway.cpus import available_cpus
from gateway.errors import PolicyError
from gateway.policy.loader import load_policy
from gateway.policy.schema import Policy

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
    out = []
    for lst in policy.listeners:
        family = socket.AF_INET6 if ":" in lst.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((lst.host, lst.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        out.append(sock)
    return out


def run(policy_path: Path) -> int:
    """Start the gateway: in this process (``server.workers = 1``), or as a supervisor of N
    worker processes sharing the listening sockets and the spool. A policy that does not load
    (syntax, keys, or a filter that cannot be built) exits 2 before anything listens."""
    try:
        policy = load_policy(policy_path)
    except PolicyError:
        return _problems(_every_problem(policy_path))
    raise_fd_limit()  # before forking: the workers inherit it
    workers = policy.workers or available_cpus()  # a container's CPU quota, not the host's
    if workers == 1:
        return _worker(policy_path, None, 0)
    code = _prepare_in_child(policy_path)
    if code:
        return code
    from gateway.workers import supervise

    sockets = bind_listeners(policy)
    return supervise(workers, lambda i: _worker(policy_path, sockets, i))


def _worker(policy_path: Path, sockets: list[socket.socket] | None, worker: int) -> int:
    """One gateway process (``sockets`` None: it binds its own and recovers the spool). It
    builds the filter chain itself; a policy error there exits 2."""
    import asyncio

    from gateway.app import serve

    return asyncio.run(serve(policy_path, sockets, recover=sockets is None, worker=worker))


def _prepare_in_child(policy_path: Path) -> int:
    """In a forked child, before any worker starts: build the whole engine (filters, rule
    sets, Bayes) once, so a policy that cannot run fails here with exit 2, then recover the
    spool (which logs its own "spool-recovered" line). This process never holds either."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from gateway.app import load_engine
            from gateway.spool import Spool

            engine = load_engine(policy_path)
            Spool(engine.policy.spool.directory).recover()
            code = 0
        except PolicyError as e:
            code = _problems(e)
        except BaseException:
            log.exception("policy check failed")
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _every_problem(policy_path: Path) -> PolicyError:
    """The policy does not load: check it the whole way (the filters' settings and
    gateway/policy/lint.py too), so one start reports every problem of the file."""
    from gateway.app import load_engine

    try:
        load_engine(policy_path)
    except PolicyError as e:
        return e
    raise AssertionError("load_engine accepted a policy that load_policy refused")


def _problems(e: PolicyError) -> int:
    for p in e.problems:
        log.error("%s", p)
    for w in e.warnings:
        log.warning("%s", w)
    return 2
