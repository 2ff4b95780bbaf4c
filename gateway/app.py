"""The running gateway: loads the policy, builds the filter chain, listens, reloads on SIGHUP
(validate first, keep the old policy on any error) and stops gracefully on SIGTERM/SIGINT
(stop accepting, let transactions in progress finish for ``limits.shutdown_grace_s``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway import quarantine, supervise
from gateway import replies as R
from gateway.deferred import defer
from gateway.dnsextras import defer_package_metadata
from gateway.dnsresolver import DnsResolver
from gateway.engine import Engine
from gateway.errors import PolicyError, StartupError
from gateway.launch import LISTEN_BACKLOG, bind_listeners
from gateway.logs import event
from gateway.policy.lint import lint
from gateway.policy.loader import (
    listen_override,
    load_policy,
    parse_policy_collecting,
    policy_dir,
    read_policy_data,
)
from gateway.policy.locate import state_dir
from gateway.policy.schema import Limits, Policy
from gateway.preflight import maildir_problems, tls_context
from gateway.qmgr import QueueManager
from gateway.registry import collect_chain
from gateway.replies import Reply
from gateway.services import Services
from gateway.spool import Spool

log = logging.getLogger("mailgate")


QMGR_TASK = "queue-manager"  # its name in supervise.FAILURES
FD_RESERVE = 256  # descriptors kept free for the spool, filters, DNS, logs, the listeners


def fd_connection_cap(policy: Policy) -> int:
    """How many client connections this process's open-file limit carries: two descriptors per
    session (its socket, and the spool file while DATA streams in and is committed, or the
    downstream connection in proxy mode), three per delivery in flight (claim, data file,
    downstream connection: ``queue.max_active``) and FD_RESERVE kept for the rest. Past it a
    client gets 421 rather than the accept loop running out of descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return policy.limits.max_connections
    return max(1, (soft - FD_RESERVE - 3 * policy.queue.max_active) // 2)


class ConnectionCounter:
    """Connections in total and per client IP, checked before the greeting. ``fd_cap``: the
    most the open-file limit carries (see ``fd_connection_cap``)."""

    def __init__(self, fd_cap: int | None = None) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.fd_cap = fd_cap

    def admit(self, ip: str, limits: Limits) -> Reply | None:
        cap = limits.max_connections if self.fd_cap is None \
            else min(limits.max_connections, self.fd_cap)
        if self.total >= cap:
            return R.TOO_BUSY
        if self.per_ip[ip] >= limits.max_connections_per_ip:
            return Reply(421, "4.7.0", "Too many connections from your address, "
                                       "try again later")
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


def load_engine(path: Path) -> Engine:
    """Load and fully validate a policy (filters built, gateway/policy/lint.py checks run);
    raises PolicyError with every problem of the file at once: the filters are built even when
    the rest has problems (from the defaults in place of the invalid values), so their settings
    are checked in the same run, but such an engine is never returned. Its ``warnings`` are the
    lint warnings, for the caller to print or log."""
    defer_package_metadata()  # before a filter imports dnspython (gateway/dnsextras.py)
    defer("nacl.signing")  # dkimpy imports it for ed25519 keys alone (gateway/deferred.py)
    data = read_policy_data(Path(path))
    policy, problems = parse_policy_collecting(data, str(path), policy_dir(path),
                                               state_dir(path))
    try:  # $MAILGATE_LISTEN, as load_policy: the addresses a single process binds
        policy = listen_override(policy)
    except PolicyError as e:
        problems += list(e.problems)
    services = Services(hostname=policy.hostname, resolver=DnsResolver(policy.dns),
                        policy_dir=policy.base_dir, state_dir=policy.state_dir)
    chain, chain_problems = collect_chain(policy, services)
    found = lint(policy, data, {f.name: f.instance for f in chain},
                 complete=len(chain) == sum(s.enabled for s in policy.filters))
    problems += chain_problems + list(found.errors)
    if problems:
        raise PolicyError(problems, found.warnings)
    engine = Engine(policy, chain, services)
    engine.warnings = found.warnings
    return engine


def load_checked(path: Path) -> tuple[Engine, ssl.SSLContext | None]:
    """``load_engine`` and the TLS files (the server's pair, the downstream's CA file), every
    problem of both in one PolicyError: a TLS pair that does not load is reported beside the
    filters' problems, not after they are fixed (the TLS files are checked whenever the rest
    of the policy's keys are valid)."""
    try:
        engine = load_engine(path)
    except PolicyError as e:
        try:
            policy = load_policy(path)
        except PolicyError:  # its own keys are wrong: what they name is not checked
            raise e from None
        _, more = _tls_files(policy)
        raise PolicyError([*e.problems, *(p for p in more if p not in e.problems)],
                          e.warnings) from None
    ctx, problems = _tls_files(engine.policy)
    if problems:
        raise PolicyError(problems, engine.warnings)
    return engine, ctx


def _tls_files(policy: Policy) -> tuple[ssl.SSLContext | None, list[str]]:
    problems: list[str] = []
    ctx = None
    try:
        ctx = tls_context(policy)  # gateway/preflight.py; PolicyError naming the file
    except PolicyError as e:
        problems += e.problems
    if (ca := policy.relay.tls_ca_file) is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            problems.append(f"{policy.source}: relay.tls_ca_file: {ca} holds no PEM CA "
                            f"certificate that loads ({' '.join(str(e).split())})")
    return ctx, problems


def open_spool(directory: Path) -> Spool:
    """The spool, its areas created if need be; StartupError naming the directory."""
    try:
        return Spool(directory)
    except OSError as e:
        raise StartupError(f"spool directory {Path(directory).absolute()}: "
                           f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
                           ) from None


class Runtime:
    def __init__(self, policy_path: Path, sockets: list[socket.socket] | None = None, *,
                 recover: bool = True, worker: int = 0,
                 prepare: Callable[[Policy], list[socket.socket]] | None = None) -> None:
        """``sockets``: listening sockets bound by a supervisor (several workers share them);
        ``recover``: run the spool recovery (once per start, before any worker delivers);
        ``prepare``: called once the policy is fully validated, before the spool is touched,
        returns the listening sockets (the spool's lock and the binds of a single process)."""
        self.policy_path = policy_path
        self.worker = worker
        self._sockets = sockets
        # fully validated (filters built, TLS loaded) before anything touches the disk
        engine, self.tls_context = load_checked(policy_path)
        self.log_warnings(engine)
        if prepare is not None:
            self._sockets = prepare(engine.policy)
        self.spool = open_spool(engine.policy.spool.directory)
        self.qmgr = QueueManager(self.spool, engine.policy, engine.syncer)
        engine.attach_queue(self.spool, self.qmgr.kick)
        self.engine = engine
        self.connections = ConnectionCounter(fd_connection_cap(engine.policy))
        self.sessions: set[Any] = set()
        self.no_sessions = asyncio.Event()  # set whenever the last session ends
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.servers: list[asyncio.Server] = []
        self.stopped = asyncio.Event()
        self.incoming_dir = self.spool.root / "incoming"
        if recover:
            recover_spool(self.spool)

    def log_warnings(self, engine: Engine) -> None:
        """The policy's mis-deployment warnings (gateway/policy/lint.py), once per start or
        reload: by the first worker only."""
        if self.worker == 0:
            for w in engine.warnings:
                log.warning("%s", w)

    def session_ended(self, session: Any) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.no_sessions.set()

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A one-shot chore nobody awaits (a close, a reconfigure, a 421): an exception it
        ends with is logged and counted (``supervise.watch``), never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        supervise.watch(task, getattr(coro, "__qualname__", "background"))

    async def start(self) -> None:
        from gateway.smtp.server import server_class

        session = server_class()  # aiosmtpd's plumbing, checked (gateway/smtp/plumbing.py)
        loop = asyncio.get_running_loop()
        # the long-lived tasks: supervised (logged, counted, started again after a failure)
        supervise.start(QMGR_TASK, self.qmgr.run)
        if self.worker == 0:  # one expiry loop per spool is enough
            supervise.start(quarantine.EXPIRY_TASK, lambda: quarantine.expire_loop(
                self.spool, lambda: self.engine.policy.quarantine))
        bound: list[str] = []
        for sock in self._sockets or bind_listeners(self.engine.policy):
            server = await loop.create_server(lambda: session(self), sock=sock,
                                              backlog=LISTEN_BACKLOG)
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            bound.append(f"{host}:{port}")
        # Handlers first: "listening" tells supervisors (and tests) that signals are safe now.
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, lambda: self.background(self.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: self.background(self.stop()))
        cap, limits = self.connections.fd_cap, self.engine.policy.limits
        if cap is not None and cap < limits.max_connections:
            log.warning("the open-file limit (%d) carries %d connections, fewer than "
                        "limits.max_connections (%d): clients past it get 421 4.3.2; raise "
                        "LimitNOFILE / ulimit -n", resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        cap, limits.max_connections)
        inactive = inactive_filters(self.engine, log_them=self.worker == 0)
        for address in bound:
            event(log, "listening", address=address, worker=self.worker,
                  policy=str(self.policy_path),
                  filters=[f.name for f in self.engine.pipeline.chain],
                  inactive=inactive or None,
                  tls=self.tls_context is not None,
                  max_connections=min(limits.max_connections, cap or limits.max_connections))

    def reload(self) -> None:
        """SIGHUP: validate the policy file again; switch only if it is entirely valid."""
        try:
            engine, tls = load_checked(self.policy_path)
            if maildirs := maildir_problems(engine.policy):  # as at start
                raise PolicyError(maildirs)
        except PolicyError as e:
            event(log, "reload-failed", level=logging.ERROR, policy=str(self.policy_path),
                  errors=list(e.problems), kept="previous policy")
            return
        self.log_warnings(engine)
        old = self.engine.policy
        if engine.policy.listeners != old.listeners:
            log.warning("reload: listener changes need a restart; keeping %s",
                        [f"{x.host}:{x.port}" for x in old.listeners])
        if engine.policy.spool != old.spool:
            log.warning("reload: spool.directory changes need a restart; keeping %s",
                        old.spool.directory)
        engine.attach_queue(self.spool, self.qmgr.kick)
        old_engine, self.engine, self.tls_context = self.engine, engine, tls
        self.background(old_engine.close())
        self.connections.fd_cap = fd_connection_cap(engine.policy)  # the relay mode may change
        self.background(self.qmgr.reconfigure(engine.policy))
        event(log, "reloaded", policy=str(self.policy_path),
              filters=[f.name for f in engine.pipeline.chain],
              inactive=inactive_filters(engine, log_them=self.worker == 0) or None)

    async def stop(self) -> None:
        if self.draining:
            return
        self.draining = True
        event(log, "stopping", sessions=len(self.sessions))
        for server in self.servers:
            server.close()
        for s in list(self.sessions):
            if s.idle and s.txn is None:
                self.background(s.close_with(Reply(421, "4.3.2", "Service shutting down"),
                                             "shutdown"))
        grace = self.engine.policy.limits.shutdown_grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace  # one grace period for sessions and deliveries together
        try:
            async with asyncio.timeout_at(deadline):
                if self.sessions:
                    self.no_sessions.clear()
                    await self.no_sessions.wait()
        except TimeoutError:
            log.warning("shutdown: %d sessions still open after %ss, closing them",
                        len(self.sessions), grace)
            for s in list(self.sessions):
                if s.transport is not None:
                    s.transport.close()
        try:
            await self.qmgr.stop(max(0.0, deadline - loop.time()))
            await self.engine.close()
        finally:  # a failure here is reported (background); the process still ends
            self.stopped.set()

    async def run_forever(self) -> None:
        await self.start()
        # What start-up built (policy, filters, rule sets, Bayes tables) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise walk it all
        # again and again under load (~3% of the CPU per message, measured with perf).
        gc.collect()
        gc.freeze()
        await self.stopped.wait()
        event(log, "stopped")


def inactive_filters(engine: Engine, *, log_them: bool) -> list[str]:
    """The filters that say they cannot give findings yet (``inactive_reason``: Bayes below
    its training minimum); each one's reason is logged as a ``filter-inactive`` warning
    (``log_them``: by one worker only)."""
    out = []
    for f in engine.pipeline.chain:
        ask = getattr(f.instance, "inactive_reason", None)
        if not callable(ask):
            continue
        try:
            reason = ask()
        except Exception as e:  # a store that cannot be read now: the filter's errors say more
            reason = f"state unknown: {type(e).__name__}: {e}"
        if reason:
            out.append(f.name)
            if log_them:
                event(log, "filter-inactive", level=logging.WARNING, filter=f.name,
                      reason=reason)
    return out


def recover_spool(spool: Spool) -> None:
    """After a crash: partial DATA files go, in-flight deliveries are retried, unreadable queue
    files are moved to corrupt/ (never dropped silently)."""
    spool.recover()  # logs its own "spool-recovered" line


async def serve(policy_path: Path, sockets: list[socket.socket] | None = None, *,
                recover: bool = True, worker: int = 0,
                prepare: Callable[[Policy], list[socket.socket]] | None = None) -> int:
    """Run the gateway until stopped; 1 (each problem logged on one line) if the policy or
    the environment does not let it start."""
    try:
        runtime = Runtime(policy_path, sockets, recover=recover, worker=worker,
                          prepare=prepare)
    except PolicyError as e:
        for p in e.problems:
            log.error("%s", p)
        for w in e.warnings:
            log.warning("%s", w)
        return 1
    except StartupError as e:
        log.error("%s", e)
        return 1
    await runtime.run_forever()
    return 0
