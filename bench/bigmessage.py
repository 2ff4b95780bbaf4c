"""Big-message benchmark (issue 6): a 50 MB message relayed with the gateway's RSS growing by
less than 1.5× the message size.

For each repeat, target and message kind: a fresh smtp-sink (dumping each message to a file), a
fresh target relaying to it, one small warm-up message of the same kind, then the big message
sent with smtplib. The RSS of the target's whole process tree is sampled every ``--interval-ms``
from before the send until the message is at the sink (plus ``--tail`` seconds); the sink's dump
is checked against what was sent (body SHA-256 and size, original header block intact).

Kinds: ``mime`` — a DKIM-signed multipart/mixed message: a short text part and a base64
application/pdf attachment that makes up the size; ``text`` — a DKIM-signed plain-text message
(bench/run.py's make_message). Both relaxed/relaxed rsa-sha256, d=bench.test, so SPF/DMARC pass.

Targets: mailgate-proxy, mailgate-queue, mailgate-full (bench/run.py's targets, with
``[limits] max_message_bytes`` raised to twice the message size) and haraka-minimal (Haraka's
connection.ini ``[max] bytes`` raised the same way; otherwise Haraka's defaults) as a reference.

Exit status 1 when a message was lost, refused or corrupted, or a run failed.

Usage: .venv/bin/python bench/bigmessage.py [--size-mb 50] [--repeats 3]
       [--kinds mime,text] [--targets mailgate-proxy,mailgate-queue,mailgate-full,haraka-minimal]
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import os
import random
import re
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import run as harness
from run import (
    HELO,
    RECIPIENT,
    SELECTOR,
    SENDER,
    SMTP_SINK,
    WORK,
    DnsServer,
    Env,
    Haraka,
    Mailgate,
    Monitor,
    Scenario,
    Sink,
    Target,
    learn_bayes,
    log,
    machine,
    make_message,
    prepare,
    rss_kb,
    tree,
    zone,
)

ALL_TARGETS = ["mailgate-proxy", "mailgate-queue", "mailgate-full", "haraka-minimal"]
ALL_KINDS = ["mime", "text"]
TARGET_RATIO = 1.5  # issue 6: RSS growth < 1.5 × the message size
MiB = 1024 * 1024
WARMUP_BYTES = 256 * 1024


# -- the messages ---------------------------------------------------------------------------------
PROSE = ("Hello team,\r\n\r\nplease find attached the full quarterly report with the scanned "
         "appendices. The budget numbers are on pages 12 to 40; the project plan and the new "
         "office layout are at the end.\r\n\r\nLet me know if anything is missing before "
         "Thursday's meeting.\r\n\r\nBest regards,\r\nBench Sender\r\n")


def _sign(raw: bytes, key_pem: bytes) -> bytes:
    import dkim

    sig = dkim.sign(raw, SELECTOR.encode(), b"bench.test", key_pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                     b"mime-version", b"content-type"])
    return sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + raw


def mime_message(size: int, key_pem: bytes, seed: int = 6) -> bytes:
    """A DKIM-signed multipart/mixed message of about ``size`` bytes (CRLF): a text part and a
    base64 ``report.pdf`` (a PDF header, then pseudo-random bytes) that makes up the size."""
    boundary = "=_bench_boundary_6f1c2a"
    head = (f"From: Bench Sender <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
            f"Subject: quarterly report (scanned, with appendices)\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <bench.big.{seed}@bench.test>\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n')
    text = (f"This is a multi-part message in MIME format.\r\n\r\n--{boundary}\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
            f"\r\n{PROSE}\r\n--{boundary}\r\n"
            'Content-Type: application/pdf; name="report.pdf"\r\n'
            'Content-Disposition: attachment; filename="report.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n"
    lines = max(1, (size - len(head) - len(text) - len(tail) - 700) // 78)  # 700: the signature
    pdf = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + random.Random(seed).randbytes(lines * 57 - 15)
    b64 = base64.encodebytes(pdf).replace(b"\n", b"\r\n")  # 76 characters + CRLF a line
    raw = (head + text).encode() + b64[:-2] + tail.encode()
    return _sign(raw, key_pem)


def text_message(size: int, key_pem: bytes) -> bytes:
    """bench/run.py's DKIM-signed plain-text message (LF there, for smtp-source), in CRLF."""
    return make_message(size, key_pem).replace(b"\n", b"\r\n")


def build(kind: str, size: int, key_pem: bytes) -> bytes:
    return mime_message(size, key_pem) if kind == "mime" else text_message(size, key_pem)


@dataclass(frozen=True)
class Sent:
    """A message as sent, and what the sink must show of it."""

    kind: str
    data: bytes  # CRLF, not dot-stuffed
    wire: bytes  # dot-stuffed, with the final "." CRLF
    head_lf: bytes  # the original header block, LF line ends, without the blank line
    body_sha: str  # SHA-256 of the body with LF line ends, as smtp-sink dumps it
    body_len: int

    @classmethod
    def of(cls, kind: str, data: bytes) -> Sent:
        head, _, body = data.partition(b"\r\n\r\n")
        body_lf = body.replace(b"\r\n", b"\n")
        wire = re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"
        return cls(kind, data, wire, head.replace(b"\r\n", b"\n") + b"\n",
                   hashlib.sha256(body_lf).hexdigest(), len(body_lf))


def check_dump(path: Path, sent: Sent) -> str:
    """'' when the dump shows the message complete, else what is wrong. smtp-sink's dump: its
    own X-*/Received headers, the message with LF line ends and dots unstuffed, an empty line."""
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        return f"no end of headers in the dump ({len(data)} bytes)"
    if body.endswith(b"\n"):
        body = body[:-1]  # the empty line smtp-sink appends
    problems = []
    if len(body) != sent.body_len or hashlib.sha256(body).hexdigest() != sent.body_sha:
        problems.append(f"body differs: {len(body)} bytes received, {sent.body_len} sent")
    if not (head + b"\n").endswith(sent.head_lf):
        problems.append("the original header block is not intact at the end of the headers")
    return "; ".join(problems)


# -- targets --------------------------------------------------------------------------------------
class BigMailgate(Mailgate):
    """bench/run.py's mailgate target with ``[limits] max_message_bytes`` raised."""

    def __init__(self, name: str, mode: str, full: bool, max_bytes: int) -> None:
        super().__init__(name, mode, full)
        self.max_bytes = max_bytes

    def policy(self, sink_port: int, sc: Scenario, env: Env, workdir: Path) -> dict[str, Any]:
        p = super().policy(sink_port, sc, env, workdir)
        p["limits"]["max_message_bytes"] = self.max_bytes
        return p


class BigHaraka(Haraka):
    """bench/run.py's Haraka target with connection.ini's ``[max] bytes`` raised."""

    def __init__(self, name: str, auth: bool, max_bytes: int) -> None:
        super().__init__(name, auth)
        self.max_bytes = max_bytes

    def configure(self, cfg: Path) -> None:
        ini = cfg / "connection.ini"
        text = ini.read_text() if ini.exists() else ""
        if re.search(r"(?m)^bytes\s*=", text):
            text = re.sub(r"(?m)^bytes\s*=.*$", f"bytes={self.max_bytes}", text)
        else:
            text += f"\n[max]\nbytes={self.max_bytes}\n"
        ini.write_text(text)


def make_target(name: str, max_bytes: int) -> Target:
    if name.startswith("haraka-"):
        return BigHaraka(name, name == "haraka-auth", max_bytes)
    mode = "proxy" if name == "mailgate-proxy" else "queue"
    return BigMailgate(name, mode, name == "mailgate-full", max_bytes)


# -- RSS sampling ---------------------------------------------------------------------------------
class Sampler(Monitor):
    """bench/run.py's Monitor at a higher rate, keeping every sample (monotonic s, kB); the
    process tree is re-read every ``tree_every`` samples (a /proc scan costs ~3 ms)."""

    def __init__(self, root: int, interval_s: float, tree_every: int = 10) -> None:
        super().__init__(root)
        self.interval_s, self.tree_every = interval_s, tree_every
        self.samples: list[tuple[float, int]] = []

    def __enter__(self) -> Sampler:
        super().__enter__()
        return self

    def _run(self) -> None:
        assert self.root is not None
        pids, n = tree(self.root), 0
        while not self._stop.is_set():
            n += 1
            if n % self.tree_every == 0:
                pids = tree(self.root)
            kb = rss_kb(pids)
            self.samples.append((time.monotonic(), kb))
            self.peak_kb = max(self.peak_kb, kb)
            self._stop.wait(self.interval_s)

    def before(self, t: float) -> list[int]:
        return [kb for ts, kb in list(self.samples) if ts < t]

    def peak_after(self, t: float) -> tuple[int, float]:
        """The highest sample from ``t`` on, and when it was taken (s after ``t``)."""
        kb, ts = max(((kb, ts) for ts, kb in list(self.samples) if ts >= t), default=(0, t))
        return kb, ts - t


# -- one run --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    target: str
    kind: str
    size: int
    base_mb: float
    peak_mb: float
    end_mb: float
    ack_s: float
    relay_s: float
    peak_at_s: float
    samples: int
    problem: str = ""

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.base_mb

    @property
    def ratio(self) -> float:
        return self.growth_mb * MiB / self.size


def send(port: int, sent: Sent, timeout_s: float) -> tuple[int, str]:
    """One transaction with SIZE; the message pre-stuffed so that only the wire is timed."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=timeout_s) as s:
        s.ehlo()
        code, msg = s.mail(SENDER, [f"SIZE={len(sent.data)}"] if s.has_extn("size") else [])
        if code != 250:
            return code, msg.decode(errors="replace")
        code, msg = s.rcpt(RECIPIENT)
        if code not in (250, 251):
            return code, msg.decode(errors="replace")
        code, msg = s.docmd("DATA")
        if code != 354:
            return code, msg.decode(errors="replace")
        s.send(sent.wire)
        code, msg = s.getreply()
        return code, msg.decode(errors="replace")


def wait_for(sink: Sink, count: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while sink.count < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return sink.count >= count


def newest_dump(directory: Path, settle_s: float = 0.3, timeout_s: float = 30) -> Path | None:
    """The newest dump file once its size stopped changing."""
    deadline = time.monotonic() + timeout_s
    last: tuple[Path, int] | None = None
    while time.monotonic() < deadline:
        files = sorted((p for p in directory.rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_mtime)
        if files:
            now = (files[-1], files[-1].stat().st_size)
            if now == last:
                return now[0]
            last = now
        time.sleep(settle_s)
    return last[0] if last else None


@dataclass(frozen=True)
class Options:
    interval_s: float
    timeout_s: float
    tail_s: float
    max_bytes: int
    keep: bool


def one_run(tname: str, sent: Sent, warm: Sent, env: Env, opt: Options) -> RunResult:
    dumps = Path(tempfile.mkdtemp(prefix="bigmessage-sink-", dir=WORK))
    dumps.chmod(0o777)  # smtp-sink drops to nobody before it writes
    sink = Sink(("-d", f"{dumps}/%H%M%S."))
    target = make_target(tname, opt.max_bytes)
    try:
        port = target.start(sink.port, Scenario("1xbig", 1, len(sent.data), 1), env)
        assert target.root is not None
        code, text = send(port, warm, opt.timeout_s)
        if code != 250 or not wait_for(sink, 1, opt.timeout_s):
            raise RuntimeError(f"warm-up message not relayed: {code} {text}")
        time.sleep(0.5)
        with Sampler(target.root, opt.interval_s) as mon:
            time.sleep(0.5)  # baseline samples
            t0 = time.monotonic()
            code, text = send(port, sent, opt.timeout_s)
            t_ack = time.monotonic()
            arrived = code == 250 and wait_for(sink, 2, opt.timeout_s)
            t_end = sink.last_change if arrived else time.monotonic()
            time.sleep(opt.tail_s)
        base = statistics.median(mon.before(t0) or [mon.samples[0][1]])
        peak, peak_at = mon.peak_after(t0)
        problem = ""
        if code != 250:
            problem = f"refused: {code} {text[:200]}"
        elif not arrived:
            problem = f"not at the sink within {opt.timeout_s:.0f} s (lost)"
        else:
            dump = newest_dump(dumps)
            problem = "no dump file" if dump is None else check_dump(dump, sent)
        if problem:
            target.keep = True
        return RunResult(tname, sent.kind, len(sent.data), base / 1024, peak / 1024,
                         mon.samples[-1][1] / 1024, t_ack - t0, t_end - t0, peak_at,
                         len(mon.samples), problem)
    finally:
        try:
            target.stop()
        finally:
            sink.stop()
            if not opt.keep:
                shutil.rmtree(dumps, ignore_errors=True)


def fmt_line(r: RunResult) -> str:
    line = (f"{r.target:15} {r.kind:5} size={r.size / MiB:6.1f}MiB base={r.base_mb:6.1f}MB "
            f"peak={r.peak_mb:6.1f}MB growth={r.growth_mb:6.1f}MB ({r.ratio:4.2f}× size) "
            f"peak_at={r.peak_at_s:5.2f}s end={r.end_mb:6.1f}MB 250_after={r.ack_s:5.2f}s "
            f"relay={r.relay_s:5.2f}s samples={r.samples}")
    if r.problem:
        line += f"   <<<<<<<<<< {r.problem} >>>>>>>>>>"
    return line


# -- summary --------------------------------------------------------------------------------------
def summarize(results: list[RunResult], targets: list[str], kinds: list[str]) -> list[str]:
    lines = ["| target | kind | runs | size MiB | baseline MB | peak MB | growth MB | "
             "growth / size | end MB | 250 after s | relay s | problems |",
             "|" + " --- |" * 12]
    verdicts = []
    for t in targets:
        ratios: list[str] = []
        met = True
        for k in kinds:
            rs = [r for r in results if r.target == t and r.kind == k]
            if not rs:
                continue
            ok = [r for r in rs if not r.problem]
            bad = len(rs) - len(ok)
            m = ok or rs

            def med(f: str, m: list[RunResult] = m) -> float:
                return statistics.median(getattr(r, f) for r in m)

            ratio = med("ratio")
            met = met and ratio < TARGET_RATIO and not bad
            ratios.append(f"{k} {ratio:.2f}×")
            lines.append(f"| {t} | {k} | {len(rs)} | {med('size') / MiB:.1f} | "
                         f"{med('base_mb'):.1f} | {med('peak_mb'):.1f} | {med('growth_mb'):.1f} "
                         f"| {ratio:.2f}× | {med('end_mb'):.1f} | {med('ack_s'):.2f} | "
                         f"{med('relay_s'):.2f} | {f'**{bad} LOST/CORRUPT**' if bad else '0'} |")
        if ratios:
            ref = "  (reference, not the gateway)" if t.startswith("haraka") else ""
            verdicts.append(f"{t}: RSS growth < {TARGET_RATIO}× size: "
                            f"{'met' if met else 'not met'} ({', '.join(ratios)}){ref}")
    return [*lines, "", *verdicts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=50.0,
                    help="message size in MiB (50); the gateway's limit is set to twice that")
    ap.add_argument("--repeats", type=int, default=3, help="runs per target × kind (3)")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--kinds", default=",".join(ALL_KINDS), help="mime,text")
    ap.add_argument("--interval-ms", type=float, default=20.0, help="RSS sampling period (20)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds for the send and for the delivery to the sink (600)")
    ap.add_argument("--tail", type=float, default=1.0,
                    help="seconds of sampling after the message reached the sink (1)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the targets' work directories and the sink's dumps")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for t in targets:
        if t not in [*ALL_TARGETS, "haraka-auth"]:
            ap.error(f"unknown target {t!r}; known: {', '.join(ALL_TARGETS)}, haraka-auth")
    for k in kinds:
        if k not in ALL_KINDS:
            ap.error(f"unknown kind {k!r}; known: {', '.join(ALL_KINDS)}")
    if not os.access(SMTP_SINK, os.X_OK):
        ap.error(f"{SMTP_SINK} missing: install the Debian package postfix")
    harness.KEEP = args.keep
    size = int(args.size_mb * MiB)
    opt = Options(args.interval_ms / 1000, args.timeout, args.tail, 2 * size, args.keep)

    targets, key_pem, pub = prepare(targets)
    log(f"building the messages ({', '.join(kinds)}, {args.size_mb:g} MiB) ...")
    big = {k: Sent.of(k, build(k, size, key_pem)) for k in kinds}
    warm = {k: Sent.of(k, build(k, WARMUP_BYTES, key_pem)) for k in kinds}
    failed = 0
    results: list[RunResult] = []
    with DnsServer(zone(pub)) as dns:
        env = Env(dns=dns, bayes_db=WORK / "bayes.db")
        if "mailgate-full" in targets:
            learn_bayes(env.bayes_db)
        print(f"# {machine()}")
        print(f"# {args.repeats} repeat(s); messages: "
              + ", ".join(f"{k} {len(s.data)} bytes" for k, s in big.items())
              + f"; RSS of the target's process tree every {args.interval_ms:g} ms")
        for _rep in range(args.repeats):
            for t in targets:
                for k in kinds:
                    try:
                        r = one_run(t, big[k], warm[k], env, opt)
                    except Exception as e:  # noqa: BLE001 - one broken target must not stop all
                        print(f"{t:15} {k:5} FAILED: {e}", flush=True)
                        failed += 1
                        continue
                    results.append(r)
                    print(fmt_line(r), flush=True)
    print()
    print(f"## Medians over {args.repeats} repeat(s)")
    print()
    print("\n".join(summarize(results, targets, kinds)))
    bad = sum(1 for r in results if r.problem)
    if bad or failed:
        print(f"\n!!!!! {bad} message(s) lost, refused or corrupted, {failed} run(s) failed "
              "— see the lines marked above !!!!!")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
