"""Run the real gateway as a separate process (``python -m gateway run``) for integration
tests: write a policy, start it on a free loopback port, read its JSON log lines, signal it."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import toml
from tests.support.daemon import stop_process

REPO = Path(__file__).resolve().parents[2]


def base_policy(downstream: str = "maildir:Maildir", **sections: Any) -> dict[str, Any]:
    """A test policy: listen on a free port, accept example.test, deliver to ``downstream``.
    Keyword arguments replace or extend top-level sections (dicts are merged one level)."""
    policy: dict[str, Any] = {
        "server": {"hostname": "mx.gateway.test", "listen": ["127.0.0.1:0"], "workers": 1},
        "domains": {"accepted": ["example.test"]},
        "relay": {"mode": "proxy", "downstream": downstream, "connect_timeout_s": 5,
                  "command_timeout_s": 10, "data_timeout_s": 20},
        "limits": {"idle_timeout_s": 30, "command_timeout_s": 30},
        "filters": [{"name": "rcpt", "recipients": ["@example.test"]},
                    {"name": "headers", "on_error": "continue"}],
        # no [actions]: the defaults (add_header 5, reject 15). A test's actions={"reject": 1}
        # is then the whole table, not merged with an add_header that could never fire, which
        # check-policy refuses (gateway/policy/lint.py)
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(policy.get(key), dict):
            policy[key] = {**policy[key], **value}
        else:
            policy[key] = copy.deepcopy(value)
    return policy


_KV_LINE = re.compile(r'^(\S+) (\S+) (\S+) (\S+)((?: \w+=(?:"(?:[^"\\]|\\.)*"|\S*))*) ?$')
_KV_PAIR = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_kv_line(line: str) -> dict[str, Any] | None:
    """One ``--log-format kv`` event line (``TS LEVEL LOGGER EVENT key=value ...``) as a dict of
    strings (quoted values unquoted), or None for other lines. Lists stay comma-joined."""
    m = _KV_LINE.match(line)
    if m is None:
        return None
    rec: dict[str, Any] = {"ts": m[1], "level": m[2], "logger": m[3], "event": m[4]}
    for key, value in _KV_PAIR.findall(m[5]):
        rec[key] = json.loads(value) if value.startswith('"') else value
    return rec


class GatewayProcess:
    def __init__(self, workdir: Path, policy: dict[str, Any] | str, *,
                 env: dict[str, str] | None = None, name: str = "policy.toml",
                 log_format: str = "json", argv: list[str] | None = None) -> None:
        self.workdir = workdir
        self.log_format = log_format  # "json" or "kv"; events() parses either
        # argv: the whole command line to run (cwd = workdir) instead of
        # ``python -m gateway run --policy <name>``; it must log in ``log_format``.
        self.argv = argv
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.policy_path = workdir / name
        self.write_policy(policy)
        self.log_path = workdir / "gateway.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def write_policy(self, policy: dict[str, Any] | str) -> None:
        text = policy if isinstance(policy, str) else toml.dumps(policy)
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)  # name may be e.g. policies/default.toml
        tmp.write_text(text)
        os.replace(tmp, self.policy_path)

    def start(self, timeout_s: float = 15) -> GatewayProcess:
        if self.proc is not None and self.proc.poll() is None:  # it would never be stopped
            raise RuntimeError(f"gateway in {self.workdir} already started (pid {self.proc.pid})")
        env = {**os.environ, "PYTHONPATH": str(REPO), **self.env}
        self._log = self.log_path.open("ab")
        argv = self.argv or [sys.executable, "-m", "gateway", "run", "--policy",
                             str(self.policy_path), "--log-format", self.log_format,
                             "--log-level", "info"]
        self.proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdout=self._log,
                                     stderr=self._log)
        ev = self.wait_for(lambda e: e.get("event") == "listening", timeout_s)
        self.port = int(ev["address"].rsplit(":", 1)[1])
        return self

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def stop(self, timeout_s: float = 15) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout_s)
        self._log.close()
        return self.proc.returncode

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.lines():
            if self.log_format == "kv":
                kv = parse_kv_line(line)
                if kv is None:
                    continue
                rec = kv
            else:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
            if name is None or rec.get("event") == name:
                out.append(rec)
        return out

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 10,
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for rec in self.events():
                if pred(rec):
                    return rec
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n"
                                     + "\n".join(self.lines()[-30:]))
            time.sleep(0.02)
        raise AssertionError("timed out waiting for a log event; log tail:\n"
                             + "\n".join(self.lines()[-30:]))

    def message_event(self, qid: str | None = None, timeout_s: float = 10) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == "message"
                             and (qid is None or e.get("qid") == qid), timeout_s)

    def maildir_messages(self, sub: str = "Maildir") -> list[bytes]:
        new = self.workdir / sub / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]
