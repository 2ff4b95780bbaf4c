"""Per-message latency with the resolver up and with it down, side by side in one run (issue 25:
"a dead dependency fails fast").

Two gateways run bench/run.py's ``mailgate-full`` target (queue mode, one worker: rcpt,
headers, spf, dkim, dmarc, authres, rules, bayes, attachments; ``[dns] timeout_s`` its default
5 s), relaying to one ``smtp-sink``. "up" asks the harness's DNS server (SPF, DMARC p=reject and
the DKIM key of bench.test); "down" asks a closed UDP port on loopback, where every query gets
ICMP port unreachable — a resolver that is not running. The same 4 KiB DKIM-signed message
(bench/run.py's) is sent with smtplib, one message per connection, one at a time, alternating
up and down after ``--warmup`` messages to each. Latency: from connect to the reply after the
end of data (the 250 in queue mode is after the fsync).

Prints median, p90 and max per side and the ratio down/up; from each gateway's log, its own
time per message (medians of the MAIL stage, the end-of-data stage and the whole) and what the
messages carried (accepted; on the down side with SPF/DKIM/DMARC temperror) and how many
``dns_server_down`` lines it wrote. Exit status 1 when a message was not answered 250 or the
down side lacked its temperrors.

Usage: .venv/bin/python bench/dns_down.py [--messages 100] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import smtplib
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from run import (
    RECIPIENT,
    SENDER,
    WORK,
    DnsServer,
    Env,
    Mailgate,
    Scenario,
    Sink,
    learn_bayes,
    machine,
    make_message,
    prepare,
    zone,
)

TEMPERRORS = ("SPF_TEMPERROR", "DKIM_TEMPERROR", "DMARC_TEMPERROR")


class DeadResolver:
    """Stands in for the harness's DnsServer: a UDP port where nothing listens."""

    def __init__(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]


def send(port: int, data: bytes) -> tuple[float, int]:
    """One message on its own connection: (seconds from connect to the end-of-data reply,
    its code)."""
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
        s.ehlo("bench.test")
        s.mail(SENDER)
        s.rcpt(RECIPIENT)
        code, _ = s.data(data)
        took = time.monotonic() - t0
    return took, code


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


class Logged(NamedTuple):
    actions: Counter[str]  # of its messages
    temperrors: int  # messages with every one of TEMPERRORS
    downs: int  # dns_server_down lines
    stage_ms: dict[str, list[float]]  # the message lines' ``ms`` and ``stage_ms`` (mail, message)


def outcomes(log: Path) -> Logged:
    """What a gateway's JSON log says of its messages."""
    actions: Counter[str] = Counter()
    temperrors = downs = 0
    stage_ms: dict[str, list[float]] = {"mail": [], "message": [], "total": []}
    for line in log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "dns_server_down":
            downs += 1
        if ev.get("event") != "message":
            continue
        actions[str(ev.get("action"))] += 1
        names = {s.split("(", 1)[0] for s in ev.get("symbols") or ()}
        temperrors += all(t in names for t in TEMPERRORS)
        stages = ev.get("stage_ms") or {}
        for stage in ("mail", "message"):
            stage_ms[stage].append(float(stages.get(stage, 0.0)))
        stage_ms["total"].append(float(ev.get("ms") or 0.0))
    return Logged(actions, temperrors, downs, stage_ms)


def wait_logged(log: Path, n: int, timeout_s: float = 10) -> Logged:
    """``outcomes`` once the log has ``n`` message lines (or ``timeout_s`` has passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = outcomes(log)
        if found[0].total() >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100, help="measured per side (100)")
    ap.add_argument("--warmup", type=int, default=3, help="sent first to each side (3)")
    args = ap.parse_args(argv)
    if args.messages < 2 or args.warmup < 0:
        ap.error("--messages must be at least 2, --warmup at least 0")
    _, key_pem, pub = prepare(["mailgate-full"])
    data = make_message(4096, key_pem).replace(b"\n", b"\r\n")
    sc = Scenario.parse("1x4k")
    with DnsServer(zone(pub)) as dns:
        up_env = Env(dns=dns, bayes_db=WORK / "bayes.db")
        learn_bayes(up_env.bayes_db)
        down_env = Env(dns=DeadResolver(), bayes_db=up_env.bayes_db)  # type: ignore[arg-type]
        sink = Sink()
        up, down = Mailgate("up", "queue", True), Mailgate("down", "queue", True)
        seen: dict[str, Logged] = {}
        try:
            up_port = up.start(sink.port, sc, up_env)
            down_port = down.start(sink.port, sc, down_env)
            bad = 0
            for _ in range(args.warmup):
                bad += send(up_port, data)[1] != 250
                bad += send(down_port, data)[1] != 250
            times: dict[str, list[float]] = {"up": [], "down": []}
            for _ in range(args.messages):
                for side, port in (("up", up_port), ("down", down_port)):
                    took, code = send(port, data)
                    bad += code != 250
                    times[side].append(took)
            for side, t in (("up", up), ("down", down)):  # read before stop() removes them
                seen[side] = wait_logged(t.workdir / "gateway.log", args.messages + args.warmup)
        finally:
            for t in (up, down):
                t.stop()
            sink.stop()
    print(f"# {machine()}")
    print(f"# mailgate-full, queue mode, one worker, [dns] timeout_s 5 (default); the 4 KiB "
          f"DKIM-signed message, {args.messages} per side after {args.warmup} warm-up, "
          "alternating, one per connection")
    print("# latency: connect to the reply after the end of data, ms")
    print(f"{'':14} {'median':>8} {'p90':>8} {'max':>8}")
    rows = {}
    for side in ("up", "down"):
        v = [x * 1000 for x in times[side]]
        rows[side] = (statistics.median(v), p90(v), max(v))
        print(f"resolver {side:5} {rows[side][0]:8.1f} {rows[side][1]:8.1f} {rows[side][2]:8.1f}")
    print(f"{'down/up':14} {rows['down'][0] / rows['up'][0]:8.2f} "
          f"{rows['down'][1] / rows['up'][1]:8.2f} {rows['down'][2] / rows['up'][2]:8.2f}")
    status = 0
    for side in ("up", "down"):
        got = seen[side]
        med = {k: statistics.median(v) if v else 0.0 for k, v in got.stage_ms.items()}
        print(f"# {side}: the gateway's own ms per message (log line, median): MAIL stage "
              f"{med['mail']:.1f}, end-of-data stage {med['message']:.1f}, whole {med['total']:.1f}")
    for side in ("up", "down"):
        got = seen[side]
        print(f"# {side}: actions {dict(got.actions)}, with {'/'.join(TEMPERRORS)}: "
              f"{got.temperrors}, dns_server_down lines: {got.downs}")
        if side == "down" and got.temperrors != args.messages + args.warmup:
            status = 1
    if bad:
        print(f"!! {bad} message(s) not answered 250")
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
