"""Connection-capacity benchmark (issue 6): N idle client connections held open against a target
while fresh clients still complete whole transactions. The target of issue 6: "5,000 concurrent
open connections held while a new client still completes a transaction in under 1 s".

Not a test: a harness that prints one line per run, medians per target over the repeats and a
verdict line per target. Each run, on loopback, on ports the OS hands out:

1. a fresh smtp-sink and a fresh target relaying to it (bench/run.py's ``Sink`` and targets);
2. one warm-up transaction, then ``--baseline`` sequential transactions with nothing held (the
   reference latency of a new client in the same run);
3. N idle clients (an asyncio loop on a thread of this process, at most ``--open-concurrency``
   connecting at once): each reads the 220 greeting, sends EHLO, reads the 250, then idles;
4. with all of them open: the target's RSS (whole process tree), then ``--sequential`` new
   clients one after another and one batch of ``--batch`` concurrent new clients (smtplib:
   connect, EHLO, MAIL, RCPT, DATA, QUIT — timed from connect to the reply to QUIT);
5. a NOOP on every held connection: how many are still alive (the target dropped none);
6. the held connections are closed; every message a new client got a 250 for must reach the
   sink (loss = exit status 1).

Usage: .venv/bin/python bench/connections.py [--connections 5000] [--repeats 5]
       [--targets mailgate-proxy,mailgate-queue,haraka-minimal]
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import resource
import smtplib
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import run as harness  # bench/run.py (this script's directory is first on sys.path)
from run import (
    HELO,
    RECIPIENT,
    SENDER,
    WORK,
    DnsServer,
    Env,
    Haraka,
    Mailgate,
    Scenario,
    Sink,
    Target,
    cpu_s,
    learn_bayes,
    log,
    machine,
    prepare,
    rss_kb,
    tree,
    zone,
)

from gateway.policy.schema import Limits  # importable once run.py put the repo on sys.path

T = TypeVar("T")
TARGETS = ["mailgate-proxy", "mailgate-queue", "mailgate-full", "haraka-minimal", "haraka-auth"]
DEFAULT_TARGETS = "mailgate-proxy,mailgate-queue,haraka-minimal"
GOAL_S = 1.0  # issue 6: a new client completes a transaction in under 1 s
HOLD_TIMEOUT_S = 60.0  # one held client: connect + greeting + EHLO
TXN_TIMEOUT_S = 60.0  # smtplib's socket timeout for a new client
HARAKA_IDLE_S = 300.0  # bench/run.py writes inactivity_timeout=300 into Haraka's smtp.ini


# -- file descriptors -----------------------------------------------------------------------------
def raise_nofile(need: int) -> int:
    """Raise this process's RLIMIT_NOFILE to at least ``need`` (the hard limit too, as root);
    the targets are started by subprocess and inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = need
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, nr_open), min(need, nr_open)))
        except (ValueError, OSError):  # not root: as high as the hard limit allows
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_of(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a running process (from /proc/PID/limits)."""
    try:
        for ln in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if ln.startswith("Max open files"):
                soft = ln.split()[3]
                return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the held (idle) clients ----------------------------------------------------------------------
async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One SMTP reply (all its lines); the last line is returned. EOF raises."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("EOF from server")
        if line[3:4] != b"-":
            return line


@dataclass
class OpenStats:
    connected: int = 0
    greeted: int = 0
    ehlo_ok: int = 0
    greet_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Holder:
    """Idle SMTP clients on an asyncio loop running in a thread of its own, so that the new
    clients (smtplib, main thread) are timed by a thread the held connections do not disturb."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.conns: list[Conn] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def open(self, port: int, n: int, concurrency: int) -> OpenStats:
        return self.call(self._open_all(port, n, concurrency), HOLD_TIMEOUT_S + n)

    async def _open_all(self, port: int, n: int, concurrency: int) -> OpenStats:
        stats, sem = OpenStats(), asyncio.Semaphore(concurrency)
        await asyncio.gather(*(self._open_one(port, sem, stats) for _ in range(n)))
        return stats

    async def _open_one(self, port: int, sem: asyncio.Semaphore, stats: OpenStats) -> None:
        async with sem:
            t0 = time.monotonic()
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(HOLD_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    stats.connected += 1
                    greeting = await read_reply(reader)
                    if not greeting.startswith(b"220"):
                        raise ConnectionRefusedError(f"greeting {greeting[:3].decode()}")
                    stats.greeted += 1
                    stats.greet_ms.append((time.monotonic() - t0) * 1000)
                    writer.write(b"EHLO held.bench.test\r\n")
                    ehlo = await read_reply(reader)
                    if not ehlo.startswith(b"250"):
                        raise ConnectionRefusedError(f"EHLO {ehlo[:3].decode()}")
                    stats.ehlo_ok += 1
                    self.conns.append((reader, writer))
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                stats.errors[f"{type(e).__name__}: {e}"[:80]] += 1
                if writer is not None:
                    writer.close()

    def alive(self) -> int:
        """NOOP on every held connection: how many answer 250 (a target that dropped one, say
        on an idle timeout, answers with its 421 or EOF)."""
        return self.call(self._alive_all(), HOLD_TIMEOUT_S + 30)

    async def _alive_all(self) -> int:
        results = await asyncio.gather(*(self._noop(r, w) for r, w in self.conns))
        return sum(results)

    @staticmethod
    async def _noop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            async with asyncio.timeout(HOLD_TIMEOUT_S):
                writer.write(b"NOOP\r\n")
                await writer.drain()
                return (await read_reply(reader)).startswith(b"250")
        except (OSError, TimeoutError):
            return False

    def close_all(self) -> None:
        self.call(self._close_all(), 60)

    async def _close_all(self) -> None:
        conns, self.conns = self.conns, []
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)

    def stop(self) -> None:
        if self.conns:
            self.close_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


# -- new clients ----------------------------------------------------------------------------------
@dataclass
class Txn:
    ms: float
    ok: bool
    error: str = ""


def message(n: int) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: connections bench {n}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <conn.{n}.{time.time_ns()}@bench.test>"
            "\r\n\r\nA new client while many others are held open.\r\n").encode()


def transaction(port: int, n: int) -> Txn:
    """One whole transaction by a new client, timed from connect to the reply to QUIT."""
    t0 = time.monotonic()
    try:
        s = smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=TXN_TIMEOUT_S)
        try:
            s.ehlo(HELO)
            s.sendmail(SENDER, [RECIPIENT], message(n))
            s.quit()
        finally:
            s.close()
    except (smtplib.SMTPException, OSError) as e:
        return Txn((time.monotonic() - t0) * 1000, False, f"{type(e).__name__}: {e}"[:160])
    return Txn((time.monotonic() - t0) * 1000, True)


def concurrent_batch(port: int, size: int, first: int) -> list[Txn]:
    with ThreadPoolExecutor(max_workers=size) as pool:
        return list(pool.map(lambda i: transaction(port, first + i), range(size)))


# -- targets --------------------------------------------------------------------------------------
class HoldingMailgate(Mailgate):
    """bench/run.py's mailgate target, with the connection limits above N (+ headroom)."""

    def __init__(self, name: str, mode: str, full: bool, connections: int) -> None:
        super().__init__(name, mode, full)
        self.max_conns = max(20000, connections + 1000)

    def policy(self, sink_port: int, sc: Scenario, env: Env, workdir: Path) -> dict[str, Any]:
        p = super().policy(sink_port, sc, env, workdir)
        p["limits"].update(max_connections=self.max_conns, max_connections_per_ip=self.max_conns)
        return p

    def connection_ends(self) -> Counter[str]:
        """The ``end`` of every ``connection`` line in the gateway's log so far."""
        ends: Counter[str] = Counter()
        text = (self.workdir / "gateway.log").read_text(errors="replace")
        lines = text.splitlines()
        if not text.endswith("\n"):
            lines = lines[:-1]  # the gateway is still writing that one
        for ln in lines:
            if '"event": "connection"' in ln:
                ends[str(json.loads(ln).get("end"))] += 1
        return ends


def make_target(name: str, connections: int) -> Target:
    if name.startswith("mailgate-"):
        mode = "proxy" if name == "mailgate-proxy" else "queue"
        return HoldingMailgate(name, mode, name == "mailgate-full", connections)
    return Haraka(name, name == "haraka-auth")


def idle_timeout_s(tname: str) -> float:
    return Limits().idle_timeout_s if tname.startswith("mailgate") else HARAKA_IDLE_S


# -- one run --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    target: str
    repeat: int
    requested: int
    connected: int
    greeted: int
    ehlo_ok: int
    open_s: float
    greet_p50_ms: float | None
    greet_max_ms: float | None
    open_errors: dict[str, int]
    rss_base_mb: float
    rss_held_mb: float
    cpu_open_s: float
    base_ms: list[float]
    seq_ms: list[float]
    batch_ms: list[float]
    failed: list[str]
    alive: int
    held_s: float
    accepted: int
    delivered: int
    target_nofile: int | None
    server_ends: dict[str, int] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return self.ehlo_ok

    @property
    def lost(self) -> int:
        return max(0, self.accepted - self.delivered)

    @property
    def new_ms(self) -> list[float]:
        return self.seq_ms + self.batch_ms

    @property
    def kib_per_conn(self) -> float | None:
        if not self.held:
            return None
        return (self.rss_held_mb - self.rss_base_mb) * 1024 / self.held


@dataclass(frozen=True)
class Plan:
    connections: int
    concurrency: int
    baseline: int
    sequential: int
    batch: int
    settle_s: float


def wait_delivery(sink: Sink, base: int, expected: int, settle_s: float) -> int:
    t0 = time.monotonic()
    while sink.count - base < expected and \
            time.monotonic() - max(sink.last_change, t0) < settle_s:
        time.sleep(0.02)
    return sink.count - base


def one_run(tname: str, rep: int, plan: Plan, env: Env) -> RunResult:
    sink = Sink()
    target = make_target(tname, plan.connections)
    holder = Holder()
    try:
        port = target.start(sink.port, Scenario("held", 1, 0, 1), env)
        assert target.root is not None
        nofile = nofile_of(target.root)
        if nofile is not None and nofile < plan.connections + 64:
            log(f"  !! {tname}: RLIMIT_NOFILE {nofile} < {plan.connections} connections + 64")
        base_count = sink.count
        txns = [transaction(port, 0)]  # warm-up (imports, pools): delivered, not timed
        txns += [transaction(port, len(txns)) for _ in range(plan.baseline)]
        base = txns[1:]
        rss_base = rss_kb(tree(target.root)) / 1024
        cpu0 = cpu_s(target.root)
        t0 = time.monotonic()
        st = holder.open(port, plan.connections, plan.concurrency)
        open_s = time.monotonic() - t0
        cpu_open = cpu_s(target.root) - cpu0
        time.sleep(0.5)  # let the target settle after the burst
        rss_held = rss_kb(tree(target.root)) / 1024
        seq = [transaction(port, len(txns) + i) for i in range(plan.sequential)]
        txns += seq
        batch = concurrent_batch(port, plan.batch, len(txns)) if plan.batch else []
        txns += batch
        alive = holder.alive()
        held_s = time.monotonic() - t0
        holder.close_all()
        accepted = sum(t.ok for t in txns)
        delivered = wait_delivery(sink, base_count, accepted, plan.settle_s)
        ends: dict[str, int] = {}
        if isinstance(target, HoldingMailgate):
            deadline = time.monotonic() + 10  # the gateway logs each session as it ends
            while (c := target.connection_ends()).total() < len(txns) + st.connected and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            ends = dict(c)
        if accepted != delivered and isinstance(target, Mailgate | Haraka):
            target.keep = True
        gms = sorted(st.greet_ms)
        return RunResult(
            tname, rep, plan.connections, st.connected, st.greeted, st.ehlo_ok, open_s,
            statistics.median(gms) if gms else None, gms[-1] if gms else None,
            dict(st.errors), rss_base, rss_held, cpu_open, [t.ms for t in base if t.ok],
            [t.ms for t in seq if t.ok], [t.ms for t in batch if t.ok],
            [t.error for t in txns if not t.ok], alive, held_s, accepted, delivered, nofile, ends)
    finally:
        try:
            holder.stop()
            target.stop()
        finally:
            sink.stop()


# -- output ---------------------------------------------------------------------------------------
def ms(values: list[float], how: str) -> str:
    if not values:
        return "-"
    v = statistics.median(values) if how == "p50" else max(values)
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def fmt_line(r: RunResult) -> str:
    rate = r.held / r.open_s if r.open_s else 0.0
    per = f"{r.kib_per_conn:.1f}" if r.kib_per_conn is not None else "-"
    gp50 = f"{r.greet_p50_ms:.1f}" if r.greet_p50_ms is not None else "-"
    gmax = f"{r.greet_max_ms:.0f}" if r.greet_max_ms is not None else "-"
    line = (f"{r.target:15} #{r.repeat} held={r.held}/{r.requested} greeted={r.greeted} "
            f"open={r.open_s:.2f}s ({rate:.0f}/s, greeting p50 {gp50} max {gmax} ms, "
            f"cpu {r.cpu_open_s:.2f}s) rss={r.rss_held_mb:.1f}MB "
            f"(+{r.rss_held_mb - r.rss_base_mb:.1f}MB, {per} KiB/conn) | new client ms: "
            f"idle p50 {ms(r.base_ms, 'p50')}; held seq p50 {ms(r.seq_ms, 'p50')} max "
            f"{ms(r.seq_ms, 'max')}, batch p50 {ms(r.batch_ms, 'p50')} max "
            f"{ms(r.batch_ms, 'max')} | alive {r.alive}/{r.held} after {r.held_s:.1f}s | "
            f"delivered {r.delivered}/{r.accepted} {'yes' if not r.lost else 'NO'} | "
            f"nofile {r.target_nofile}")
    if r.lost:
        line += f"   <<<<<<<<<< LOSS: {r.lost} accepted messages not delivered >>>>>>>>>>"
    if r.failed:
        line += f"   [{len(r.failed)} new-client transaction(s) failed: {r.failed[0]}]"
    if r.open_errors:
        line += f"   [open errors: {r.open_errors}]"
    odd = {k: v for k, v in r.server_ends.items() if k not in ("eof", "quit")}
    if odd:
        line += f"   [gateway session ends: {odd}]"
    return line


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(tname: str, rs: list[RunResult], plan: Plan) -> list[str]:
    n = plan.connections
    worst = [max(r.new_ms) if r.new_ms else float("inf") for r in rs]
    slow = sum(1 for r in rs for x in r.new_ms if x >= GOAL_S * 1000)
    total = sum(len(r.new_ms) + len(r.failed) for r in rs)  # warm-up/baseline failures too
    per = [r.kib_per_conn for r in rs if r.kib_per_conn is not None]
    held_all = all(r.held == n and r.alive == n for r in rs)
    lost = sum(r.lost for r in rs)
    line = (f"{tname:15} {len(rs)} run(s), medians: held {med([r.held for r in rs]):.0f}/{n}, "
            f"greeted {med([r.greeted for r in rs]):.0f}, open {med([r.open_s for r in rs]):.2f}s, "
            f"RSS with {n} open {med([r.rss_held_mb for r in rs]):.1f}MB "
            f"({med(per):.1f} KiB/conn), new client ms: idle p50 "
            f"{med([med(r.base_ms) for r in rs]):.1f}, held seq p50 "
            f"{med([med(r.seq_ms) for r in rs]):.1f} max {med([max(r.seq_ms, default=0) for r in rs]):.1f}, "
            f"batch of {plan.batch} p50 {med([med(r.batch_ms) for r in rs]):.1f} max "
            f"{med([max(r.batch_ms, default=0) for r in rs]):.1f}; delivered "
            f"{'yes' if not lost else f'NO ({lost} lost)'}")
    failed = sum(len(r.failed) for r in rs)
    met = held_all and not failed and med(worst) < GOAL_S * 1000
    why = []
    if not held_all:
        why.append(f"only {min(min(r.held, r.alive) for r in rs)} of {n} held in some run")
    if failed:
        why.append(f"{failed} transaction(s) failed")
    verdict = (f"{tname}: target: new client < {GOAL_S:.0f} s with {n} held: "
               f"{'met' if met else 'not met'} (worst new-client transaction per run, median "
               f"over runs {med(worst):.0f} ms, max {max(worst):.0f} ms; {slow} of {total} "
               f"at or over {GOAL_S:.0f} s{'; ' + '; '.join(why) if why else ''})")
    return [line, verdict]


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=5000, help="idle connections held (5000)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per target (5)")
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma-separated, of {', '.join(TARGETS)} ({DEFAULT_TARGETS})")
    ap.add_argument("--open-concurrency", type=int, default=200,
                    help="held clients connecting at the same time (200)")
    ap.add_argument("--baseline", type=int, default=5,
                    help="new-client transactions before any connection is held (5)")
    ap.add_argument("--sequential", type=int, default=5,
                    help="new clients one after another while N are held (5)")
    ap.add_argument("--batch", type=int, default=20,
                    help="new clients at the same time while N are held (20; 0 = none)")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds without a new delivery before the rest counts as lost (30)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the targets' work directories (logs, configs) in bench/.work/")
    ap.add_argument("--json", type=Path, help="also append every run as a JSON line here")
    args = ap.parse_args(argv)
    harness.KEEP = args.keep
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    plan = Plan(args.connections, args.open_concurrency, args.baseline, args.sequential,
                args.batch, args.settle)
    nofile = raise_nofile(2 * args.connections + 4096)  # mailgate counts 2 per session
    targets, _key, pub = prepare(targets)
    lim = Limits()
    print(f"# {machine()}")
    print(f"# {plan.connections} idle connections held (EHLO done), opened {plan.concurrency} "
          f"at a time; new clients: {plan.baseline} with none held, then {plan.sequential} "
          f"sequential + {plan.batch} concurrent; {args.repeats} repeat(s); RLIMIT_NOFILE "
          f"{nofile} (inherited by the targets)")
    print(f"# deadlines: mailgate idle_timeout_s {lim.idle_timeout_s:g}, command_timeout_s "
          f"{lim.command_timeout_s:g}, max_session_s {lim.max_session_s:g}; Haraka "
          f"inactivity_timeout {HARAKA_IDLE_S:g} s")
    results: list[RunResult] = []
    jf = args.json.open("a") if args.json else None
    with DnsServer(zone(pub)) as dns:
        env = Env(dns=dns, bayes_db=WORK / "bayes.db")
        if "mailgate-full" in targets:
            learn_bayes(env.bayes_db)
        for rep in range(1, args.repeats + 1):
            for t in targets:
                try:
                    r = one_run(t, rep, plan, env)
                except Exception as e:  # noqa: BLE001 - one broken target must not stop all
                    print(f"{t:15} #{rep} FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                results.append(r)
                print(fmt_line(r), flush=True)
                if r.held_s > 0.8 * idle_timeout_s(t):
                    print(f"   !! held for {r.held_s:.0f} s: close to the target's idle "
                          "timeout; see 'alive'", flush=True)
                if jf:
                    jf.write(json.dumps({**asdict(r), "lost": r.lost}) + "\n")
                    jf.flush()
    if jf:
        jf.close()
    print()
    print(f"## Medians over {args.repeats} repeat(s), {plan.connections} connections held")
    for t in targets:
        rs = [r for r in results if r.target == t]
        if rs:
            print(*summary(t, rs, plan), sep="\n")
    lost = sum(r.lost for r in results)
    if lost:
        print(f"\n!!!!! LOSS: {lost} accepted messages were not delivered — see the lines "
              "marked LOSS !!!!!")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
