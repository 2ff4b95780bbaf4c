"""``limits.max_concurrent_checks`` and ``limits.check_wait_s`` end to end: a message-stage filter
that takes its time and counts how many of it run at once, two clients ending their DATA
together, and the message log line's ``check_wait_ms``."""

from __future__ import annotations

import os
import smtplib
import textwrap
import threading
from pathlib import Path
from typing import Any

from tests.support.gateway import REPO, GatewayProcess, base_policy

SLOW_SOURCE = '''
"""Sleeps in the message stage and reports how many messages were in it at once."""
import asyncio

from gateway.filterapi import Filter, Result, Symbol


class Slow(Filter):
    name = "slow"
    running = 0
    peak = 0

    @classmethod
    def from_config(cls, cfg, services):
        f = cls()
        f.delay = float(cfg.get("delay_s", 0.5))
        return f

    async def on_message(self, ctx):
        cls = type(self)
        cls.running += 1
        cls.peak = max(cls.peak, cls.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            cls.running -= 1
        return Result(symbols=(Symbol("SLOW_PEAK", (str(cls.peak),)),))
'''


def start(gateway_factory: Any, tmp_path: Path, *, delay_s: float, limit: int,
          wait_s: float) -> GatewayProcess:
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "slowfilter.py").write_text(textwrap.dedent(SLOW_SOURCE))
    policy = base_policy(
        limits={"max_concurrent_checks": limit, "check_wait_s": wait_s},
        filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                 {"name": "slow", "module": "slowfilter:Slow", "delay_s": delay_s}])
    env = {"PYTHONPATH": os.pathsep.join([str(lib), str(REPO)])}
    return gateway_factory(policy, env=env)


def send_two_at_once(gw: GatewayProcess) -> list[dict[str, Any]]:
    """Two clients send their final dot at the same moment; their message log lines."""
    ready = threading.Barrier(2)
    qids: list[str] = []

    def client(n: int) -> None:
        with smtplib.SMTP(*gw.address, timeout=20) as s:
            s.ehlo("client.test")
            assert s.mail(f"c{n}@sender.test")[0] == 250
            assert s.rcpt("alice@example.test")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
            ready.wait(10)
            s.send(b".\r\n")
            code, text = s.getreply()
            assert code == 250, (code, text)
            qids.append(text.decode().rsplit(" ", 1)[1])

    threads = [threading.Thread(target=client, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(qids) == 2
    return [gw.message_event(q) for q in qids]


def peak(ev: dict[str, Any]) -> str:
    [sym] = [s for s in ev["symbols"] if s.startswith("SLOW_PEAK")]
    return sym.split("[", 1)[1].rstrip("]")


def test_one_slot_runs_the_checks_one_after_the_other(gateway_factory, tmp_path):
    gw = start(gateway_factory, tmp_path, delay_s=0.5, limit=1, wait_s=5)
    events = send_two_at_once(gw)
    assert sorted(peak(e) for e in events) == ["1", "1"]  # never two in the filter at once
    waits = sorted(e["check_wait_ms"] for e in events)
    assert waits[0] == 0  # the first got the slot at once
    assert 400 <= waits[1] < 5000  # the second waited for the first's 0.5 s


def test_two_slots_let_both_run_at_once(gateway_factory, tmp_path):
    gw = start(gateway_factory, tmp_path, delay_s=0.5, limit=2, wait_s=5)
    events = send_two_at_once(gw)
    assert sorted(peak(e) for e in events) == ["2", "2"]
    assert [e["check_wait_ms"] for e in events] == [0, 0]


def test_a_message_that_waited_check_wait_s_runs_without_a_slot(gateway_factory, tmp_path):
    # The first holds the only slot for 2 s; the second waits 0.2 s, then runs beside it.
    gw = start(gateway_factory, tmp_path, delay_s=2.0, limit=1, wait_s=0.2)
    events = send_two_at_once(gw)
    assert sorted(peak(e) for e in events) == ["2", "2"]
    waits = sorted(e["check_wait_ms"] for e in events)
    assert waits[0] == 0
    assert 150 <= waits[1] < 1500  # about check_wait_s, far less than the first's 2 s
