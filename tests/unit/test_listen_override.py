"""``$MAILGATE_LISTEN`` / ``mailgate run --listen`` replace ``server.listen``, and ``mailgate
health`` reports a listener that does not greet."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.errors import PolicyError
from gateway.policy.loader import LISTEN_ENV, load_policy

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "policies" / "default.toml"


def test_env_replaces_the_policys_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LISTEN_ENV, "0.0.0.0:2525, [::1]:2526")
    got = [(x.host, x.port) for x in load_policy(DEFAULT).listeners]
    assert got == [("0.0.0.0", 2525), ("::1", 2526)]
    monkeypatch.delenv(LISTEN_ENV)
    assert [(x.host, x.port) for x in load_policy(DEFAULT).listeners] == [("127.0.0.1", 2525)]


def test_a_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LISTEN_ENV, "0.0.0.0")
    with pytest.raises(PolicyError) as e:
        load_policy(DEFAULT)
    assert list(e.value.problems) == [f"{LISTEN_ENV}: listen: must be host:port (port 0 picks a free "
                                "port), got '0.0.0.0'"]


def _mailgate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=60)


def test_health_says_which_listener_does_not_answer() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = _mailgate("health", "--policy", str(DEFAULT), "--timeout-s", "2",
                  **{LISTEN_ENV: f"127.0.0.1:{port}"})
    assert r.returncode == 1
    assert r.stderr == f"mailgate health: 127.0.0.1:{port}: Connection refused\n"


def test_health_wants_a_220_greeting() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]


    def greet_busy() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"421 4.3.2 busy\r\n")
        conn.close()

    t = threading.Thread(target=greet_busy, daemon=True)
    t.start()
    r = _mailgate("health", "--policy", str(DEFAULT), **{LISTEN_ENV: f"0.0.0.0:{port}"})
    srv.close()
    assert r.returncode == 1
    assert r.stderr == f"mailgate health: 0.0.0.0:{port}: greeted with 421 instead of 220\n"
