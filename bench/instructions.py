"""CPU instructions per message, this tree against another revision, under valgrind's callgrind.

Not a test. On a shared, noisy machine msgs/s and CPU seconds move by 10-30% between runs of
the same code; instruction counts do not (two runs of the same code agree within ~1%), so a
change of a few per cent in the work per message shows here when the throughput benchmark
(bench/run.py) cannot see it. What it does not see: time in the kernel, cache misses, waiting.

For each target and repeat, alternating base and this tree: start the gateway under callgrind
with bench/run.py's policy for that target (DNS from the same local test server, smtp-sink
downstream), send a warm-up batch, zero the counters, send ``--messages`` with smtp-source,
wait until the sink has them all, dump the counters. The figure is instructions (all threads of
the gateway process) per message.

Usage:
    .venv/bin/python bench/instructions.py --base HEAD~1 [--targets mailgate-proxy,mailgate-queue]
        [--messages 400] [--sessions 20] [--size 4k] [--repeats 2]

Needs valgrind (Debian package ``valgrind``) besides what bench/run.py needs. The base revision
is checked out in a temporary git worktree and run with this tree's virtualenv and harness.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import run as br  # noqa: E402

TARGETS = ["mailgate-proxy", "mailgate-queue", "mailgate-full"]
WARMUP = 100


def measure(code: Path, tname: str, env: br.Env, msgfile: Path, sessions: int, size: int,
            messages: int) -> int:
    """Instructions for ``messages`` messages through ``tname`` running from ``code``."""
    sink = br.Sink()
    target = br.make_target(tname)
    assert isinstance(target, br.Mailgate)
    work = Path(tempfile.mkdtemp(prefix=f"cg-{tname}-", dir=br.WORK))
    proc: subprocess.Popen[bytes] | None = None
    try:
        scenario = br.Scenario.parse(f"{sessions}x{size}")
        policy = target.policy(sink.port, scenario, env, work)
        port = br.free_port()
        policy["server"]["listen"] = [f"127.0.0.1:{port}"]
        (work / "policy.toml").write_text(br.toml.dumps(policy))
        out = work / "callgrind.out"
        with (work / "gateway.log").open("wb") as logf:
            proc = subprocess.Popen(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, "-m", "gateway", "run", "--policy", str(work / "policy.toml"),
                 "--log-format", "json", "--log-level", "info"],
                cwd=work, env={**os.environ, "PYTHONPATH": str(code)},
                stdout=logf, stderr=subprocess.STDOUT)
        br.wait_banner(port, 300, proc, "gateway under callgrind")
        br.smtp_source(port, min(sessions, 10), WARMUP, msgfile)
        wait_for(sink, WARMUP)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                       capture_output=True)
        base = sink.count
        br.smtp_source(port, sessions, messages, msgfile)
        wait_for(sink, base + messages)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                       capture_output=True)
        dumps = sorted(work.glob("callgrind.out.*"))
        if not dumps:
            raise RuntimeError(f"no callgrind dump in {work}")
        m = re.search(r"^summary:\s+(\d+)", dumps[-1].read_text(errors="replace"), re.M)
        if m is None:
            raise RuntimeError(f"no summary line in {dumps[-1]}")
        return int(m.group(1))
    finally:
        br.terminate(proc)
        sink.stop()
        if not br.KEEP:
            shutil.rmtree(work, ignore_errors=True)


def wait_for(sink: br.Sink, count: int, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while sink.count < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"sink has {sink.count} of {count} messages after {timeout_s}s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1)")
    ap.add_argument("--targets", default="mailgate-proxy,mailgate-queue")
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", default="4k")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} missing: install the Debian package valgrind")
    try:
        size = br.Scenario.parse(f"1x{args.size}").size
    except SystemExit:
        ap.error(f"bad --size {args.size!r}: want e.g. 4k or 65536")
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    here = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix="mailgate-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO,
                   check=True, capture_output=True)
    try:
        targets, key_pem, pub = br.prepare(targets)
        with br.DnsServer(br.zone(pub)) as dns:
            env = br.Env(dns=dns, bayes_db=br.WORK / "bayes.db")
            if "mailgate-full" in targets:
                br.learn_bayes(env.bayes_db)
            msgfile = br.WORK / f"message-{size}.eml"
            msgfile.write_bytes(br.make_message(size, key_pem))
            print(f"# {br.machine()}")
            print(f"# {args.messages} messages per run at {args.sessions} sessions, "
                  f"{size} bytes each, after {WARMUP} warm-up; base {rev}, this tree {here}")
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.repeats):
                for t in targets:
                    for label, code in (("base", tree), ("this", REPO)):
                        n = measure(code, t, env, msgfile, args.sessions, size, args.messages)
                        per = n / args.messages
                        results.setdefault((t, label), []).append(per)
                        print(f"{t:15} {label:4} {per / 1e6:8.3f} M instructions/message",
                              flush=True)
            print()
            print("| target | base " + rev + " | this tree | ratio |")
            print("| --- | --- | --- | --- |")
            for t in targets:
                a = statistics.median(results[(t, "base")])
                b = statistics.median(results[(t, "this")])
                print(f"| {t} | {a / 1e6:.3f} M | {b / 1e6:.3f} M | {b / a:.3f} |")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                       capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
