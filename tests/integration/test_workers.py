"""Several worker processes share the listening socket and the spool: every message is
delivered exactly once, SIGTERM stops them all, a worker that dies is replaced."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.gateway import base_policy
from tests.support.sink import Sink
from tests.support.toml import dumps


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_two_workers_deliver_everything_exactly_once_and_stop_together(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}",
                                         server={"workers": 2}, relay={"mode": "queue"},
                                         queue={"scan_interval_s": 0.2}))
        ev = gw.wait_for(lambda e: e.get("event") == "workers")
        pids = ev["pids"]
        assert len(pids) == 2
        gw.wait_for(lambda e: e.get("event") == "listening" and e.get("worker") == 1)

        def send(i: int) -> str:
            with smtplib.SMTP(*gw.address, timeout=20) as s:
                s.sendmail("a@sender.test", ["alice@example.test"],
                           f"Subject: n{i}\r\nX-N: {i}\r\n\r\nbody {i}\r\n".encode())
                return "ok"

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(send, range(60))) == ["ok"] * 60
        msgs = sink.wait_for(60, 30)
        time.sleep(1.0)  # a duplicate would show up here
        numbers = sorted(int(m.data.split(b"X-N: ")[1].split(b"\r\n")[0])
                         for m in sink.messages)
        assert numbers == list(range(60)), f"{len(msgs)} messages, {len(sink.messages)} at sink"

        # a worker that dies is replaced, and the replacement serves
        os.kill(pids[0], signal.SIGKILL)
        died = gw.wait_for(lambda e: e.get("event") == "worker-died" and e.get("pid") == pids[0])
        assert died["worker"] == 0
        new = gw.wait_for(lambda e: e.get("event") == "worker-restarted")["pid"]
        assert _alive(new)
        for i in range(60, 70):
            send(i)
        sink.wait_for(70, 20)
        time.sleep(1.0)
        numbers = sorted(int(m.data.split(b"X-N: ")[1].split(b"\r\n")[0])
                         for m in sink.messages)
        assert numbers == list(range(70))  # every message once, none twice after the kill
        assert gw.stop() == 0
        for pid in (new, pids[1]):
            assert not _alive(pid)


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_the_supervisor_holds_no_engine_and_a_bad_filter_exits_2(gateway_factory, tmp_path):
    """The supervisor only forks and forwards signals: it never imports the SMTP server, the
    engine or asyncio (whose ssl module alone is ~10 MB per process), the workers do. A filter
    that cannot be built still fails the start with exit 2 before anything listens."""
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}",
                                         server={"workers": 2}))
        pids = gw.wait_for(lambda e: e.get("event") == "workers")["pids"]
        gw.wait_for(lambda e: e.get("event") == "listening" and e.get("worker") == 1)
        assert gw.proc is not None
        supervisor, worker = _maps(gw.proc.pid), _maps(pids[0])
        assert "_ssl" in worker and "_asyncio" in worker  # the probe sees them where they are
        assert "_ssl" not in supervisor and "_asyncio" not in supervisor
        with smtplib.SMTP(*gw.address, timeout=20) as s:
            s.sendmail("a@sender.test", ["alice@example.test"], b"Subject: s\r\n\r\nhi\r\n")
        sink.wait_for(1, 20)
    bad = base_policy("maildir:Maildir", server={"workers": 2},
                      spool={"directory": str(tmp_path / "spool")},
                      filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                               {"name": "nosuchfilter"}])
    path = tmp_path / "bad.toml"
    path.write_text(dumps(bad))
    out = subprocess.run([sys.executable, "-m", "gateway", "run", "--policy", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.returncode == 1, out.stderr
    assert "filters.nosuchfilter: no such filter" in out.stderr
    assert "listening" not in out.stderr and "workers" not in out.stderr
