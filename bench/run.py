"""Throughput benchmark: Postfix's smtp-source -> TARGET -> Postfix's smtp-sink, all on loopback.

Not a test: a harness that prints one line per run and, at the end, medians over the repeats,
ratios to ``direct`` and to the Haraka peer, and a markdown table for the README.

Targets (see bench/README.md):
  direct          smtp-source -> smtp-sink (the limit of the box)
  mailgate-proxy  relay.mode = "proxy", only the rcpt filter
  mailgate-queue  relay.mode = "queue" (fsync on: the gateway's only mode), only the rcpt filter
  mailgate-full   queue mode + rcpt, headers, spf, dkim, dmarc, authres, rules, bayes (trained on
                  the SpamAssassin corpus), attachments; DNS from a local test server
  haraka-minimal  Haraka: rcpt_to.in_host_list + queue/smtp_forward
  haraka-auth     Haraka: spf, dkim (verify), headers + the above
  postfix-relay   Postfix as a queueing relay (a reference, not in the default targets: a
                  compiled MTA with an fsync'd queue on the same box; needs root)

Scenarios: ``SESSIONSxSIZE[@wWORKERS]``, e.g. ``200x4k`` or ``200x4k@w2`` (mailgate
``[server] workers``, Haraka ``nodes``). One message per connection, as inbound MX traffic.

Usage: .venv/bin/python bench/run.py [--quick] [--repeats N] [--messages N]
       [--targets direct,mailgate-queue,...] [--scenarios 20x4k,200x4k,...]
       [--cpu-per-worker CORES]
"""

from __future__ import annotations

import argparse
import base64
import bisect
import email.utils
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import toml  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402

BENCH = REPO / "bench"
WORK = BENCH / ".work"
HARAKA_DIR = BENCH / "haraka"
HARAKA_VERSION = "3.3.4"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CORPUS = REPO.parent / "shared" / "corpora" / "spamassassin" / "train"
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@example.test"
HELO = "bench.test"
SELECTOR = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

ALL_TARGETS = ["direct", "mailgate-proxy", "mailgate-queue", "mailgate-full",
               "haraka-minimal", "haraka-auth"]
# not run unless asked for: a reference point, not a peer (see bench/README.md)
EXTRA_TARGETS = ["postfix-relay"]
ALL_SCENARIOS = ["20x4k", "200x4k", "20x64k", "200x4k@w2"]
KEEP = False  # --keep: leave every target's work directory (logs, config) in bench/.work/
CAP: CpuCap | None = None  # --cpu-per-worker: mailgate's and Haraka's process trees in a cgroup
PEER = {"mailgate-proxy": "haraka-minimal", "mailgate-queue": "haraka-minimal",
        "mailgate-full": "haraka-auth"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A free loopback port from the OS (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_banner(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
                what: str = "target") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not greet on 127.0.0.1:{port} within {timeout_s} s")


# -- scenarios ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    spec: str
    sessions: int
    size: int
    workers: int

    @classmethod
    def parse(cls, spec: str) -> Scenario:
        m = re.fullmatch(r"(\d+)x(\d+)([kKmM]?)(?:@w(\d+))?", spec)
        if not m:
            raise SystemExit(f"bad scenario {spec!r}: want SESSIONSxSIZE[@wN], e.g. 200x4k@w2")
        size = int(m[2]) * {"": 1, "k": 1024, "m": 1024 * 1024}[m[3].lower()]
        return cls(spec, int(m[1]), size, int(m[4] or 1))


# -- the message ----------------------------------------------------------------------------------
# The body's words: English's commonest at the head of a vocabulary of 20,000 made-up ones (a
# seeded generator, so every run sends the same text), drawn with Zipf frequencies. Distinct
# words as in real prose: ~350 of a 4 KiB body's ~570, ~3,600 of a 64 KiB body's ~11,100. (The
# bench's text used to repeat 40 words, which flattered the content filters that work per
# distinct word: the Bayes tokenizer and its lookups.)
_COMMON = ("the of and to a in is it you that he was for on are with as i his they be at one "
           "have this from or had by not word but what some we can out other were all there "
           "when up use your how said an each she which do their time if will way about many "
           "then them write would like so these her long make thing see him two has look more "
           "day could go come did number sound no most people my over know water than call "
           "first who may down side been now find").split()
_SYLLABLES = ("ba ce di fo gu ka le mi no pu ra se ti vo wu xa ze an er in on us tr st pl ch sh th "
              "qu br").split()


def _vocabulary(size: int, rng: random.Random) -> list[str]:
    out, seen = list(_COMMON), set(_COMMON)
    while len(out) < size:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 3, 4, 5))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def text_words(seed: int = 5321) -> Iterator[str]:
    """An endless, repeatable stream of the body's words (see above)."""
    rng = random.Random(seed)
    vocab = _vocabulary(20_000, rng)
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(vocab))))
    while True:
        yield vocab[bisect.bisect_left(weights, rng.random() * weights[-1])]


def make_message(size: int, key_pem: bytes) -> bytes:
    """A DKIM-signed (relaxed/relaxed, rsa-sha256, d=bench.test) plain-text message of about
    ``size`` bytes, LF line ends (smtp-source -F sends each line with CRLF)."""
    import dkim

    headers = [f"From: Bench Sender <{SENDER}>", f"To: <{RECIPIENT}>",
               "Subject: weekly meeting notes", f"Date: {email.utils.formatdate()}",
               "Message-ID: <bench.0001@bench.test>", "MIME-Version: 1.0",
               "Content-Type: text/plain; charset=us-ascii"]
    body: list[str] = []
    n, total, words = len("\r\n".join(headers)) + 600, 0, text_words()
    while n + total < size:
        line: list[str] = []
        while sum(len(w) + 1 for w in line) < 70:
            line.append(next(words))
        body.append(" ".join(line))
        total += len(body[-1]) + 2
    raw = ("\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body) + "\r\n").encode()
    sig = dkim.sign(raw, SELECTOR.encode(), b"bench.test", key_pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return (sig + raw).replace(b"\r\n", b"\n")


def dkim_key(work: Path) -> tuple[bytes, str]:
    key = work / "dkim.key"
    if not key.exists():
        subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(key), "2048"],
                       check=True, capture_output=True)
    der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return key.read_bytes(), base64.b64encode(der).decode()


def zone(pub_b64: str) -> str:
    rec = f"v=DKIM1; k=rsa; p={pub_b64}"
    chunks = " ".join(f'"{rec[i:i + 200]}"' for i in range(0, len(rec), 200))
    return "\n".join([
        'bench.test. 3600 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
        "bench.test. 3600 IN A 127.0.0.1",
        "bench.test. 3600 IN MX 10 bench.test.",
        '_dmarc.bench.test. 3600 IN TXT "v=DMARC1; p=reject"',
        f"{SELECTOR}._domainkey.bench.test. 3600 IN TXT {chunks}",
        "example.test. 3600 IN MX 10 mx.example.test.",
        "mx.example.test. 3600 IN A 127.0.0.1",
    ])


# -- process-tree accounting --------------------------------------------------------------------
def _stat(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()  # fields from 3 (state) on


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            total += int(st[21]) * PAGE_KB  # field 24: rss in pages
    return total


def cpu_s(root: int) -> float:
    """utime+stime of the live tree plus the waited-for children of the root."""
    ticks = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            ticks += int(st[11]) + int(st[12])  # fields 14, 15
            # 16, 17: cutime, cstime: children that ended and were waited for (Postfix's
            # master collects smtpd processes that reached max_use during the run)
            ticks += int(st[13]) + int(st[14])
    return ticks / CLK_TCK


def box_ticks() -> tuple[int, int, int]:
    """The whole machine's CPU time so far from ``/proc/stat``, in ticks summed over all CPUs:
    (busy, steal, total). Busy is user + nice + system + irq + softirq (whoever ran: the
    target, smtp-source, smtp-sink, this harness's DNS server, the kernel's loopback work);
    steal is time the hypervisor gave this VM's runnable CPUs to someone else."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal, sum(fields)


def box_share(t0: tuple[int, int, int], t1: tuple[int, int, int]) -> tuple[float, float]:
    """Busy and steal between two ``box_ticks`` readings, in % of all CPUs' time."""
    total = t1[2] - t0[2]
    if total <= 0:
        return 0.0, 0.0
    return 100 * (t1[0] - t0[0]) / total, 100 * (t1[1] - t0[1]) / total


class Monitor:
    """Polls the RSS of a process tree every 50 ms; keeps the peak."""

    def __init__(self, root: int | None) -> None:
        self.root, self.peak_kb = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        if self.root is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.root is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self.root is not None
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb(tree(self.root)))
            self._stop.wait(0.05)


# -- a CPU cap per worker (--cpu-per-worker) ------------------------------------------------------
class CpuCap:
    """A cgroup (v2, or v1's ``cpu`` hierarchy) for a target's process tree, with a CFS quota of
    ``cores_per_worker`` × the run's workers. On a box whose two cores the load generator and the
    sink share with the target, two workers find the box, not themselves, the limit; capped at
    half a core each, one worker and two stay well inside the box, and the ratio measures the
    gateway (bench/README.md). Needs root."""

    PERIOD_US = 10_000  # short: a throttled target waits at most the rest of 10 ms

    def __init__(self, cores_per_worker: float) -> None:
        self.per_worker = cores_per_worker
        name = f"mailgate-bench-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").exists():
            if "cpu" not in (v2 / "cgroup.controllers").read_text().split():
                raise RuntimeError("cgroup v2 without the cpu controller")
            (v2 / "cgroup.subtree_control").write_text("+cpu")
            self.dir, self.v2 = v2 / name, True
        elif (v2 / "cpu" / "cpu.cfs_quota_us").exists():
            self.dir, self.v2 = v2 / "cpu" / name, False
        else:
            raise RuntimeError("no cgroup cpu controller (v2 or v1) under /sys/fs/cgroup")
        self.dir.mkdir()

    def limit(self, workers: int) -> None:
        quota = round(self.per_worker * workers * self.PERIOD_US)
        if self.v2:
            (self.dir / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (self.dir / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.dir / "cpu.cfs_quota_us").write_text(str(quota))

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroup: a shell moves itself in, then execs argv (same PID; no
        preexec_fn, which is unsafe in this threaded harness)."""
        procs = shlex.quote(str(self.dir / "cgroup.procs"))
        return ["/bin/sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def throttled_s(self) -> float:
        """Seconds the cgroup's tasks waited for quota so far (cpu.stat)."""
        stat = dict(ln.split() for ln in (self.dir / "cpu.stat").read_text().splitlines())
        return int(stat["throttled_usec"]) / 1e6 if self.v2 else int(stat["throttled_time"]) / 1e9

    def remove(self) -> None:
        for _ in range(100):  # the last processes of a stopped target may still be exiting
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        log(f"  !! could not remove {self.dir}")


def capped(argv: list[str]) -> list[str]:
    return CAP.wrap(argv) if CAP is not None else argv


# -- the sink -----------------------------------------------------------------------------------
class Sink:
    """smtp-sink -c on a free port; a reader thread follows its ``mesg=N`` counter."""

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        """``extra_args``: more smtp-sink options, e.g. ``("-d", template)`` to dump each
        message to a file (bench/bigmessage.py checks what arrived)."""
        self.port = free_port()
        self.count = 0
        self.last_change = time.monotonic()
        argv = [SMTP_SINK, "-c", "-m", "2000", "-t", "300", *extra_args]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        self.proc = subprocess.Popen(argv + [f"127.0.0.1:{self.port}", "4096"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        wait_banner(self.port, 10, self.proc, "smtp-sink")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            buf += chunk
            *done, buf = re.split(rb"[\r\n]", buf)
            for part in reversed(done):
                m = re.search(rb"mesg=(\d+)", part)
                if m:
                    n = int(m[1])
                    if n != self.count:
                        self.count, self.last_change = n, time.monotonic()
                    break

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# -- targets ------------------------------------------------------------------------------------
def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, and SIGKILL after 30 s, for a target we started."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Target:
    name = ""
    root: int | None = None
    keep = False

    def start(self, sink_port: int, sc: Scenario, env: Env) -> int:  # returns the port
        raise NotImplementedError

    def stop(self) -> None:
        pass


class Direct(Target):
    name = "direct"

    def start(self, sink_port: int, sc: Scenario, env: Env) -> int:
        return sink_port


class Mailgate(Target):
    def __init__(self, name: str, mode: str, full: bool) -> None:
        self.name, self.mode, self.full = name, mode, full
        self.proc: subprocess.Popen[bytes] | None = None

    def policy(self, sink_port: int, sc: Scenario, env: Env, workdir: Path) -> dict[str, Any]:
        filters: list[dict[str, Any]] = [{"name": "rcpt", "recipients": ["@example.test"]}]
        if self.full:
            filters += [
                {"name": "headers", "on_error": "continue"},
                {"name": "spf", "on_error": "continue", "timeout_s": 15, "check_timeout_s": 10},
                {"name": "dkim", "on_error": "continue", "timeout_s": 15, "dns_timeout_s": 5},
                {"name": "dmarc", "on_error": "tempfail", "timeout_s": 15},
                {"name": "authres", "on_error": "tempfail"},
                {"name": "rules", "on_error": "continue",
                 "shipped": True},
                {"name": "bayes", "on_error": "continue", "db_path": str(env.bayes_db),
                 "min_spam": 100, "min_ham": 100},
                {"name": "attachments", "on_error": "tempfail", "timeout_s": 20},
            ]
        return {
            "server": {"hostname": "mailgate.bench.test", "listen": ["127.0.0.1:0"],
                       "workers": sc.workers},
            "domains": {"accepted": ["example.test"]},
            "relay": {"mode": self.mode, "downstream": f"smtp://127.0.0.1:{sink_port}"},
            "dns": {"nameservers": [f"127.0.0.1:{env.dns.port}"]},
            "limits": {"max_connections": 20000, "max_connections_per_ip": 20000},
            "spool": {"directory": str(workdir / "spool")},
            "filters": filters,
        }

    def start(self, sink_port: int, sc: Scenario, env: Env) -> int:
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=WORK))
        self.workdir = workdir
        policy = workdir / "policy.toml"
        policy.write_text(toml.dumps(self.policy(sink_port, sc, env, workdir)))
        self.logf = (workdir / "gateway.log").open("wb")
        self.proc = subprocess.Popen(
            capped([sys.executable, "-m", "gateway", "run", "--policy", str(policy),
                    "--log-format", "json", "--log-level", "info"]),
            cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=self.logf, stderr=subprocess.STDOUT)
        self.root = self.proc.pid
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in (workdir / "gateway.log").read_text(errors="replace").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "listening":
                    port = int(ev["address"].rsplit(":", 1)[1])
                    wait_banner(port, 10, self.proc, self.name)
                    return port
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start; log tail:\n"
                           + (workdir / "gateway.log").read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        terminate(self.proc)
        self.logf.close()
        errors = [ln for ln in (self.workdir / "gateway.log").read_text(errors="replace")
                  .splitlines() if '"level": "error"' in ln or "Traceback" in ln]
        if errors or KEEP or self.keep:
            outcomes: dict[str, int] = {}
            for ln in (self.workdir / "gateway.log").read_text(errors="replace").splitlines():
                if '"event": "message"' in ln:
                    ev = json.loads(ln)
                    k = f"{ev.get('action')}/{ev.get('relay')}/{str(ev.get('reply'))[:9]}"
                    outcomes[k] = outcomes.get(k, 0) + 1
            log(f"  {self.name} message outcomes: {outcomes}")
            log(f"  !! {self.name}: {len(errors)} error lines in {self.workdir}/gateway.log, "
                f"first: {errors[0][:300] if errors else '-'}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def prepare(targets: list[str]) -> tuple[list[str], bytes, str]:
    """What every bench script needs before its runs: the work directory, Haraka installed
    (its targets dropped, with a message, when it cannot be), the DKIM key. Returns the
    targets left, the key (PEM) and its public half (base64, for the DNS zone)."""
    WORK.mkdir(parents=True, exist_ok=True)
    if any(t.startswith("haraka") for t in targets):
        try:
            ensure_haraka()
        except Exception as e:  # noqa: BLE001 - report and go on with the other targets
            log(f"!! Haraka unavailable, its targets are skipped: {e}")
            targets = [t for t in targets if not t.startswith("haraka")]
    key_pem, pub = dkim_key(WORK)
    return targets, key_pem, pub


def ensure_haraka() -> Path:
    """Haraka from npm into bench/haraka/ (once); returns bin/haraka."""
    binary = HARAKA_DIR / "node_modules" / "Haraka" / "bin" / "haraka"
    if not binary.exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            raise RuntimeError("node/npm not installed: Haraka targets skipped")
        log(f"installing Haraka@{HARAKA_VERSION} into {HARAKA_DIR} ...")
        HARAKA_DIR.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["npm", "install", "--prefix", str(HARAKA_DIR), "--no-audit",
                            "--no-fund", f"Haraka@{HARAKA_VERSION}"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not binary.exists():
            raise RuntimeError(f"npm install Haraka@{HARAKA_VERSION} failed:\n{r.stderr[-2000:]}")
    return binary


# Node's resolver reads /etc/resolv.conf and Haraka has no nameserver setting: this preload
# (NODE_OPTIONS=--require) points the default resolver (callback and promise APIs, which
# Haraka's spf and dkim plugins use) at the test DNS server in every Haraka process.
DNS_PRELOAD = """\
const dns = require('node:dns');
const servers = [process.env.BENCH_DNS];
dns.setServers(servers);
dns.promises.setServers(servers);
// haraka-auth: Haraka's spf plugin skips clients in private/loopback space, which would leave
// it idle here; treat the loopback client as a public one, as for inbound MX traffic.
if (process.env.BENCH_PUBLIC_LOOPBACK) {
  const nu = require(process.env.BENCH_NET_UTILS);
  const isPrivate = nu.is_private_ip, isLocal = nu.is_local_ip;
  nu.is_private_ip = (ip) => (ip === '127.0.0.1' ? false : isPrivate(ip));
  nu.is_rfc1918 = nu.is_private_ip;
  nu.is_local_ip = (ip) => (ip === '127.0.0.1' ? false : isLocal(ip));
}
"""


class Haraka(Target):
    def __init__(self, name: str, auth: bool) -> None:
        self.name, self.auth = name, auth
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, sink_port: int, sc: Scenario, env: Env) -> int:
        binary = ensure_haraka()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=WORK))
        workdir = self.workdir / "haraka"
        # Haraka's own skeleton (connection.ini etc.), then our settings over it
        subprocess.run(["node", str(binary), "-i", str(workdir)], check=True,
                       capture_output=True, timeout=60)
        cfg = workdir / "config"
        port = free_port()
        # nodes: 1 worker = Haraka's single process mode (nodes=0, like mailgate's workers = 1
        # without a supervisor); N > 1 = Haraka's cluster (a master + N workers).
        nodes = 0 if sc.workers == 1 else sc.workers
        (cfg / "smtp.ini").write_text(f"[main]\nlisten=127.0.0.1:{port}\nnodes={nodes}\n"
                                      "inactivity_timeout=300\n")
        (cfg / "me").write_text("haraka.bench.test\n")
        (cfg / "host_list").write_text("example.test\n")
        (cfg / "smtp_forward.ini").write_text(f"host=127.0.0.1\nport={sink_port}\n"
                                              "enable_tls=false\n")
        (cfg / "log.ini").write_text("[main]\nlevel=info\ntimestamps=false\n")
        plugins = ["rcpt_to.in_host_list"]
        if self.auth:
            plugins = ["spf", *plugins, "dkim", "headers"]
            (cfg / "dkim.ini").write_text("[sign]\nenabled=false\n[verify]\nenabled=true\n"
                                          "timeout=29\n")
        (cfg / "plugins").write_text("\n".join([*plugins, "queue/smtp_forward"]) + "\n")
        self.configure(cfg)
        preload = self.workdir / "dns-preload.js"
        preload.write_text(DNS_PRELOAD)
        self.logf = (self.workdir / "haraka.log").open("wb")
        self.proc = subprocess.Popen(
            capped(["node", str(binary), "-c", str(workdir)]), cwd=workdir,
            # HARAKA: the preload loads haraka-net-utils, and with it haraka-config, before
            # Haraka has set this from -c; unset, haraka-config reads its own package's config
            # directory and caches it (haraka-auth then ran as one process whatever nodes said)
            env={**os.environ, "NODE_OPTIONS": f"--require {preload}", "HARAKA": str(workdir),
                 "BENCH_DNS": f"127.0.0.1:{env.dns.port}",
                 "BENCH_NET_UTILS": str(HARAKA_DIR / "node_modules" / "haraka-net-utils"),
                 **({"BENCH_PUBLIC_LOOPBACK": "1"} if self.auth else {})},
            stdout=self.logf, stderr=subprocess.STDOUT)
        self.root = self.proc.pid
        try:
            wait_banner(port, 60, self.proc, self.name)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; log tail:\n"
                               + (self.workdir / "haraka.log").read_text(errors="replace")[-3000:]
                               ) from None
        return port

    def configure(self, cfg: Path) -> None:
        """Hook for subclasses: more settings in Haraka's config directory before it starts
        (bench/bigmessage.py raises connection.ini's ``[max] bytes``)."""

    def stop(self) -> None:
        terminate(self.proc)
        self.logf.close()
        text = (self.workdir / "haraka.log").read_text(errors="replace")
        bad = [ln for ln in text.splitlines()
               if re.search(r"\[(CRIT|ALERT|EMERG)\]|Error:", ln) and "tls_" not in ln]
        if bad or KEEP or self.keep:
            log(f"  !! {self.name}: {len(bad)} error lines in {self.workdir}/haraka.log, "
                f"first: {bad[0][:300] if bad else '-'}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class PostfixRelay(Target):
    """Postfix (smtpd, cleanup, qmgr, smtp; Debian's package) as a queueing relay to the sink:
    tests/support/postfix.py's private instance, its defaults but for relaying example.test to
    the sink and a process limit above the sessions. A reference for what a compiled MTA with
    an fsync'd queue does on this box, not a peer: with a process per connection its RSS sums
    100-220 processes (shared pages counted in each) and is not comparable."""

    name = "postfix-relay"

    def start(self, sink_port: int, sc: Scenario, env: Env) -> int:
        from tests.support.postfix import PostfixInstance
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=WORK))
        self.pf = PostfixInstance(self.workdir, domains=("unused.bench.test",), smtpd_options={
            "virtual_mailbox_domains": "", "relay_domains": "example.test",
            "relay_transport": "smtp", "default_transport": "smtp",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            # an smtpd process per client: with fewer than the sessions (the default is 100),
            # 200 sessions ran at 131-151 msgs/s with the box 26-38% busy; with enough, 458
            "default_process_limit": str(max(100, sc.sessions + 20))})
        self.pf.start()
        self.root = self.pf.root_pid
        return self.pf.port

    def stop(self) -> None:
        self.pf.stop()
        bad = [ln for ln in self.pf.log_lines() if re.search(r"(fatal|panic|error):", ln)]
        if bad or KEEP or self.keep:
            log(f"  !! {self.name}: {len(bad)} error lines in {self.pf.maillog}, "
                f"first: {bad[0][:300] if bad else '-'}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def make_target(name: str) -> Target:
    return {"direct": lambda: Direct(),
            "mailgate-proxy": lambda: Mailgate(name, "proxy", False),
            "mailgate-queue": lambda: Mailgate(name, "queue", False),
            "mailgate-full": lambda: Mailgate(name, "queue", True),
            "haraka-minimal": lambda: Haraka(name, False),
            "haraka-auth": lambda: Haraka(name, True),
            "postfix-relay": lambda: PostfixRelay()}[name]()


# -- environment shared by all runs ---------------------------------------------------------------
@dataclass
class Env:
    dns: DnsServer
    bayes_db: Path
    messages: dict[int, Path] = field(default_factory=dict)


def learn_bayes(db: Path) -> None:
    if db.exists():
        return
    if not CORPUS.is_dir():
        log(f"  !! {CORPUS} missing: bayes stays untrained (BAYES_UNTRAINED)")
        return
    for kind in ("spam", "ham"):
        subprocess.run([sys.executable, "-m", "gateway", "learn", f"--{kind}", "--db", str(db),
                        str(CORPUS / kind)], cwd=REPO, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})


# -- one run ------------------------------------------------------------------------------------
@dataclass
class RunResult:
    target: str
    scenario: str
    sessions: int
    size: int
    workers: int
    requested: int
    sent: int
    received: int
    lost: int
    seconds: float
    rate: float
    peak_rss_mb: float | None
    cpu_s: float | None
    box_busy_pct: float = 0.0  # the whole machine during the run, % of all CPUs (box_share)
    box_steal_pct: float = 0.0
    cap_cores: float = 0.0  # --cpu-per-worker × workers, 0 = uncapped
    throttled_s: float = 0.0  # time the capped target waited for its quota
    note: str = ""


def smtp_source(port: int, sessions: int, messages: int, msgfile: Path,
                ) -> tuple[int, int, str]:
    argv = [SMTP_SOURCE, "-c", "-A", "-M", HELO, "-f", SENDER, "-t", RECIPIENT,
            "-s", str(sessions), "-m", str(messages), "-F", str(msgfile), f"127.0.0.1:{port}"]
    p = subprocess.run(argv, capture_output=True)
    counts = re.findall(rb"\d+", p.stdout)
    return p.returncode, int(counts[-1]) if counts else 0, p.stderr.decode(errors="replace")


def one_run(tname: str, sc: Scenario, messages: int, env: Env, settle_s: float,
            ) -> RunResult:
    sink = Sink()
    target = make_target(tname)
    cap = CAP if isinstance(target, Mailgate | Haraka) else None
    if cap is not None:
        cap.limit(sc.workers)
    try:
        port = target.start(sink.port, sc, env)
        msgfile = env.messages[sc.size]
        # warm-up (imports, caches, pools), not measured
        smtp_source(port, min(sc.sessions, 10), 50, msgfile)
        deadline = time.monotonic() + 30
        while sink.count < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        base = sink.count
        cpu0 = cpu_s(target.root) if target.root else None
        box0 = box_ticks()
        thr0 = cap.throttled_s() if cap is not None else 0.0
        with Monitor(target.root) as mon:
            t0 = time.monotonic()
            rc, sent, err = smtp_source(port, sc.sessions, messages, msgfile)
            t_src = time.monotonic()
            # queue mode delivers after the 250: wait for the sink until no progress for settle_s
            while sink.count - base < messages and time.monotonic() - max(
                    sink.last_change, t_src) < settle_s:
                time.sleep(0.02)
            t_end = max(t_src, sink.last_change)
        box = box_share(box0, box_ticks())
        thr = cap.throttled_s() - thr0 if cap is not None else 0.0
        cpu1 = cpu_s(target.root) if target.root else None
        received = sink.count - base
        if messages - received and isinstance(target, Mailgate | Haraka | PostfixRelay):
            target.keep = True  # keep its logs for the post-mortem
        seconds = t_end - t0
        notes = []
        if rc != 0:
            notes.append(f"smtp-source exit {rc}")
        if err.strip():
            notes.append("smtp-source: " + err.strip().splitlines()[-1][:160])
        return RunResult(
            tname, sc.spec, sc.sessions, sc.size, sc.workers, messages, sent, received,
            messages - received, seconds, received / seconds if seconds > 0 else 0.0,
            mon.peak_kb / 1024 if target.root else None,
            cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None, *box,
            cap.per_worker * sc.workers if cap is not None else 0.0, thr, "; ".join(notes))
    finally:
        try:
            target.stop()
        finally:
            sink.stop()


def fmt_line(r: RunResult) -> str:
    rss = f"{r.peak_rss_mb:7.1f}" if r.peak_rss_mb is not None else "      -"
    cpu = f"{r.cpu_s:7.2f}" if r.cpu_s is not None else "      -"
    line = (f"{r.target:15} {r.scenario:10} sess={r.sessions:<4} size={r.size // 1024:>3}KiB "
            f"w={r.workers} sent={r.sent:<6} recv={r.received:<6} lost={r.lost:<5} "
            f"{r.seconds:7.2f}s {r.rate:8.1f} msg/s rss={rss}MB cpu={cpu}s "
            f"box={r.box_busy_pct:3.0f}% steal={r.box_steal_pct:2.0f}%")
    if r.cap_cores:
        line += f" cap={r.cap_cores:.2f}cores throttled={r.throttled_s:.2f}s"
    if r.lost:
        line += f"   <<<<<<<<<< LOSS: {r.lost} of {r.requested} messages not delivered >>>>>>>>>>"
    if r.note:
        line += f"   [{r.note}]"
    return line


# -- summary ------------------------------------------------------------------------------------
def summarize(results: list[RunResult], targets: list[str], scenarios: list[Scenario]) -> str:
    med: dict[tuple[str, str], dict[str, Any]] = {}
    for t in targets:
        for sc in scenarios:
            rs = [r for r in results if r.target == t and r.scenario == sc.spec]
            if not rs:
                continue
            rss = [r.peak_rss_mb for r in rs if r.peak_rss_mb is not None]
            cpu = [r.cpu_s / r.received * 1000 for r in rs if r.cpu_s is not None and r.received]
            med[(t, sc.spec)] = {
                "runs": len(rs), "rate": statistics.median(r.rate for r in rs),
                "seconds": statistics.median(r.seconds for r in rs),
                "lost": sum(r.lost for r in rs), "sent": sum(r.sent for r in rs),
                "received": sum(r.received for r in rs),
                "rss": statistics.median(rss) if rss else None,
                "cpu_ms": statistics.median(cpu) if cpu else None,
                "box": statistics.median(r.box_busy_pct for r in rs),
                "cap": rs[0].cap_cores,
                "used": statistics.median(r.cpu_s / r.seconds for r in rs
                                          if r.cpu_s is not None and r.seconds) if cpu else None}
    head = ("| target | scenario | runs | msgs/s (median) | × direct | × Haraka peer | "
            "peak RSS MB | RSS × peer | CPU ms/msg | box CPU % | lost |")
    lines = [head, "|" + " --- |" * 11]
    for sc in scenarios:
        for t in targets:
            m = med.get((t, sc.spec))
            if m is None:
                continue
            d = med.get(("direct", sc.spec))
            x_direct = f"{m['rate'] / d['rate']:.2f}" if d and d["rate"] else "-"
            peer = PEER.get(t)
            p = med.get((peer, sc.spec)) if peer else None
            x_peer = f"{m['rate'] / p['rate']:.2f} ({peer})" if p and p["rate"] else "-"
            rss_peer = (f"{m['rss'] / p['rss']:.2f}" if p and p["rss"] and m["rss"] else "-")
            rss_s = f"{m['rss']:.0f}" if m["rss"] is not None else "-"
            cpu_s_ = f"{m['cpu_ms']:.2f}" if m["cpu_ms"] is not None else "-"
            lost = f"**{m['lost']} LOST**" if m["lost"] else "0"
            lines.append(f"| {t} | {sc.spec} | {m['runs']} | {m['rate']:.0f} | {x_direct} | "
                         f"{x_peer} | {rss_s} | {rss_peer} | {cpu_s_} | {m['box']:.0f} | "
                         f"{lost} |")
    # 1 -> 2 worker scaling
    extra = []
    for sc in scenarios:
        if sc.workers == 1:
            continue
        base = next((s for s in scenarios if s.workers == 1 and s.sessions == sc.sessions
                     and s.size == sc.size), None)
        if base is None:
            continue
        for t in targets:
            a, b = med.get((t, base.spec)), med.get((t, sc.spec))
            if t != "direct" and a and b and a["rate"]:
                ratio = f"- {t}: {base.spec} → {sc.spec}: {b['rate'] / a['rate']:.2f}× "
                if a["cap"] and a["used"] is not None and b["used"] is not None:
                    # capped: the quota, not the box, should be the limit; if the box is
                    # near 100% at 2 workers it is not, and the ratio says little
                    extra.append(ratio + f"(cap {a['cap']:.2f} → {b['cap']:.2f} cores, used "
                                 f"{a['used']:.2f} → {b['used']:.2f}; box CPU {a['box']:.0f}% "
                                 f"→ {b['box']:.0f}%)")
                else:
                    # all CPU work grows with msgs/s: the box, full, allows 100 / busy% as much
                    ceiling = f"{100 / a['box']:.2f}×" if a["box"] else "-"
                    extra.append(ratio + f"(box CPU {a['box']:.0f}% → {b['box']:.0f}%; the box "
                                 f"allows ~{ceiling})")
    if extra:
        lines += ["", "Worker scaling (msgs/s ratio):", *extra]
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("node") else "-"
    return (f"{platform.node()}: {os.cpu_count()} CPU ({cpu}), {mem:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"node {node}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2000 messages per run, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="runs per target×scenario (3)")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages per run (10000; --quick 2000)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds without a new delivery at the sink before the rest counts "
                         "as lost (30)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the targets' work directories (logs, configs) in bench/.work/")
    ap.add_argument("--json", type=Path, help="also write every run as JSON lines here")
    ap.add_argument("--cpu-per-worker", type=float, metavar="CORES",
                    help="run mailgate's and Haraka's process trees in a cgroup with a CPU "
                         "quota of CORES × workers (e.g. 0.5: the worker scaling on a box "
                         "the load generator shares; needs root)")
    args = ap.parse_args(argv)
    global KEEP, CAP
    KEEP = args.keep
    repeats = args.repeats or (1 if args.quick else 3)
    messages = args.messages or (2000 if args.quick else 10000)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in ALL_TARGETS + EXTRA_TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(ALL_TARGETS + EXTRA_TARGETS)}")
    scenarios = [Scenario.parse(s.strip()) for s in args.scenarios.split(",") if s.strip()]
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not os.access(tool, os.X_OK):
            ap.error(f"{tool} missing: install the Debian package postfix")
    if args.cpu_per_worker is not None:
        if not 0 < args.cpu_per_worker <= (os.cpu_count() or 1):
            ap.error(f"--cpu-per-worker: more than 0 and at most {os.cpu_count()} cores")
        try:
            CAP = CpuCap(args.cpu_per_worker)
        except (OSError, RuntimeError) as e:
            ap.error(f"--cpu-per-worker: no cgroup to cap the targets' CPU: {e}")

    try:
        return _run(args, targets, scenarios, messages, repeats)
    finally:
        if CAP is not None:
            CAP.remove()


def _run(args: argparse.Namespace, targets: list[str], scenarios: list[Scenario],
         messages: int, repeats: int) -> int:
    targets, key_pem, pub = prepare(targets)
    with DnsServer(zone(pub)) as dns:
        env = Env(dns=dns, bayes_db=WORK / "bayes.db")
        if "mailgate-full" in targets:
            learn_bayes(env.bayes_db)
        for sc in scenarios:  # written afresh each time: the Date must be current
            if sc.size not in env.messages:
                path = WORK / f"message-{sc.size}.eml"
                path.write_bytes(make_message(sc.size, key_pem))
                env.messages[sc.size] = path
        print(f"# {machine()}")
        print(f"# {messages} messages per run, {repeats} repeat(s), one message per connection")
        if CAP is not None:
            print(f"# mailgate and Haraka capped at {CAP.per_worker} core(s) per worker "
                  f"({CAP.dir}, CFS period {CAP.PERIOD_US} µs)")
        results: list[RunResult] = []
        jf = args.json.open("a") if args.json else None
        for _rep in range(repeats):
            for sc in scenarios:
                for t in targets:
                    try:
                        r = one_run(t, sc, messages, env, args.settle)
                    except Exception as e:  # noqa: BLE001 - one broken target must not stop all
                        print(f"{t:15} {sc.spec:10} FAILED: {e}", flush=True)
                        continue
                    results.append(r)
                    print(fmt_line(r), flush=True)
                    if jf:
                        jf.write(json.dumps(r.__dict__) + "\n")
                        jf.flush()
        if jf:
            jf.close()
    print()
    print(f"## Medians over {repeats} repeat(s), {messages} messages per run")
    print()
    print(summarize(results, targets, scenarios))
    lost = sum(r.lost for r in results)
    if lost:
        print(f"\n!!!!! LOSS: {lost} messages were not delivered in "
              f"{sum(1 for r in results if r.lost)} run(s) — see the lines marked LOSS !!!!!")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
