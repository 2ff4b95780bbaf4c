"""Policy files from the command line and at run time: ``mailgate check-policy`` on every file
in policies/ and on broken files, ``mailgate run`` refusing a bad policy, and SIGHUP reload
(validate first, keep the old policy on any error; open connections keep the policy they
started with)."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy.loader import load_policy
from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy

POLICY_DIR = REPO / "policies"
POLICY_FILES = sorted(p for pattern in ("*.toml", "*.yaml", "*.yml")
                      for p in POLICY_DIR.glob(pattern))
QID_RE = re.compile(r"\(([0-9A-Z]{16})\)$")


def mailgate(*args: str, cwd: Path = REPO, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- check-policy ------------------------------------------------------------------------------

def _setting_values(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [x for v in value for x in _setting_values(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _setting_values(v)]
    return []


def test_every_file_in_policies_is_loaded_by_a_test():
    # Policy files are each checked below. Any other file (a recipient map, say) must be named
    # in the filter settings of one of them, so that checking that policy loads it too
    # (relative to the policy file's directory, as every path in a policy).
    assert POLICY_FILES, "policies/ holds no policy file"
    referenced = {(p.parent / v).resolve() for p in POLICY_FILES
                  for f in load_policy(p).filters for v in _setting_values(dict(f.settings))}
    others = [p.name for p in POLICY_DIR.iterdir()
              if p.is_file() and p not in POLICY_FILES and not p.name.startswith(".")
              and p.resolve() not in referenced]
    assert others == [], f"policies/ files that no policy (and so no test) loads: {others}"


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.name for p in POLICY_FILES])
def test_check_policy_ok_for_each_shipped_policy(path, monkeypatch):
    monkeypatch.chdir(REPO)
    rel = path.relative_to(REPO)
    r = mailgate("check-policy", str(rel))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == f"{rel}: ok"
    # The summary agrees with what the loader reads from the file.
    with_cwd = load_policy(path)
    assert lines[1] == "  listen: " + ", ".join(f"{x.host}:{x.port}"
                                                for x in with_cwd.listeners)
    assert lines[2] == f"  relay: {with_cwd.relay.mode} -> {with_cwd.relay.downstream}"
    assert lines[3] == ("  accepted domains: "
                        + (", ".join(sorted(with_cwd.accepted_domains)) or "(none)"))
    enabled = [f for f in with_cwd.filters if f.enabled]
    filter_lines = [x for x in lines if x.startswith("  filter ")]
    assert [x.split()[1].rstrip(":") for x in filter_lines] == [f.name for f in enabled]
    for line, spec in zip(filter_lines, enabled, strict=True):
        assert f"(timeout {spec.timeout_s:g}s, on_error {spec.on_error};" in line


def test_check_policy_summary_for_a_known_policy(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(base_policy("smtp://127.0.0.1:10025")))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    *lines, last = r.stdout.splitlines()
    assert lines == [
        f"{path}: ok",
        "  listen: 127.0.0.1:0",
        "  relay: proxy -> smtp://127.0.0.1:10025",
        "  accepted domains: example.test",
        "  filter rcpt: rcpt (timeout 10s, on_error tempfail; built-in filters.rcpt)",
        "  filter headers: message (timeout 10s, on_error continue; built-in filters.headers)",
    ]
    assert re.fullmatch(r"  library patches: (\d+) of \1 in use", last), last  # all in use


def test_check_policy_bad_file_exits_1_with_every_error_on_stderr(tmp_path):
    path = tmp_path / "bad.toml"
    policy = base_policy(limits={"idle_timeout_s": 0, "max_recipent": 5},
                         relay={"downstream": "smtp://nowhere"},
                         rules=[{"name": "r", "action": "reject"}])
    path.write_text(toml.dumps(policy))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert sorted(r.stderr.splitlines()) == sorted([
        f"{path}: limits.max_recipent: unknown key (did you mean 'max_recipients'?)",
        f"{path}: limits.idle_timeout_s: must be a number > 0",
        f"{path}: relay.downstream: smtp:// needs host:port",
        f"{path}: rules.r: needs if_any or if_all",
        f"{path}: 4 problem(s)",
    ])
    assert "Traceback" not in r.stderr


def test_check_policy_reports_filter_setting_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(toml.dumps(base_policy(filters=[
        {"name": "rcpt", "recipients": ["nobody"]}, {"name": "headers", "strict": True}])))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{path}: filters.rcpt.recipients: 'nobody' is not an address or @domain",
        f"{path}: filters.headers.strict: unknown setting (known: )",
        f"{path}: 2 problem(s)",
    ]


def test_check_policy_syntax_errors_and_missing_file(tmp_path):
    bad_toml = tmp_path / "syntax.toml"
    bad_toml.write_text("[server\nhostname = 1\n")
    r = mailgate("check-policy", str(bad_toml), cwd=tmp_path)
    assert r.returncode == 1
    first, last = r.stderr.splitlines()
    assert first.startswith(f"{bad_toml}: TOML syntax: ")
    assert last == f"{bad_toml}: 1 problem(s)"

    bad_yaml = tmp_path / "syntax.yaml"
    bad_yaml.write_text("server: [unclosed\n")
    r = mailgate("check-policy", str(bad_yaml), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{bad_yaml}: YAML syntax: ")

    r = mailgate("check-policy", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{tmp_path / 'absent.toml'}: cannot read: ")


def test_check_policy_loads_the_tls_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    path = tmp_path / "tls.toml"
    path.write_text(toml.dumps(base_policy(tls={"cert_file": str(cert), "key_file": str(key)})))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{path}: tls.cert_file: {cert} holds no PEM certificate",
                                     f"{path}: tls.key_file: {key} holds no PEM private key",
                                     f"{path}: 2 problem(s)"]


# -- run with a bad policy ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_with_bad_policy_exits_nonzero_without_listening(tmp_path):
    port = free_port()
    path = tmp_path / "bad.toml"
    path.write_text(toml.dumps(base_policy(server={"listen": [f"127.0.0.1:{port}"]},
                                           limits={"idle_timeout_s": -1},
                                           filters=[{"name": "rcpt", "colour": "red"}])))
    r = mailgate("run", "--policy", str(path), "--log-format", "json", cwd=tmp_path)
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stderr.splitlines()]
    assert not any(rec.get("event") == "listening" for rec in records)
    assert [rec["msg"] for rec in records if rec["level"] == "error"] == [  # all, at once
        f"{path}: limits.idle_timeout_s: must be a number > 0",
        f"{path}: filters.rcpt.colour: unknown setting (known: domains, recipient_map_file, "
        f"recipients)"]
    # It never bound the port: we can.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    # Filter errors (found while building the chain) stop it the same way.
    path.write_text(toml.dumps(base_policy(server={"listen": [f"127.0.0.1:{port}"]},
                                           filters=[{"name": "rcpt", "colour": "red"}])))
    r = mailgate("run", "--policy", str(path), "--log-format", "json", cwd=tmp_path)
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stderr.splitlines()]
    assert [rec["msg"] for rec in records] == [
        f"{path}: filters.rcpt.colour: unknown setting (known: domains, recipient_map_file, "
        f"recipients)"]
    assert not (tmp_path / "spool").exists()


# -- SIGHUP reload -----------------------------------------------------------------------------

def send(gw: GatewayProcess, rcpt: str, sender: str = "bob@sender.test") -> tuple[int, str]:
    """One transaction on a new connection; the first non-250 reply, or the DATA reply."""
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail(sender)[0] == 250
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = s.data(f"From: {sender}\r\nTo: {rcpt}\r\nSubject: reload\r\n\r\nhi\r\n"
                            .encode())
        return code, text.decode()


def reload(gw: GatewayProcess, policy: dict | str, expect: str) -> dict:
    before = len(gw.events(expect))
    gw.write_policy(policy)
    gw.signal(signal.SIGHUP)
    gw.wait_for(lambda e: e.get("event") == expect and len(gw.events(expect)) > before)
    return gw.events(expect)[before]


def policy_with(*domains: str) -> dict:
    return base_policy(domains={"accepted": list(domains)},
                       filters=[{"name": "rcpt", "recipients": [f"@{d}" for d in domains]},
                                {"name": "headers", "on_error": "continue"}])


def test_sighup_reload_valid_then_invalid_keeps_last_good_policy(gateway_factory):
    gw = gateway_factory(policy_with("example.test"))
    code, text = send(gw, "carol@new.test")
    assert (code, text) == (550, text) and text.startswith("5.7.1 Relay access denied (")

    # A connection opened before the reload ...
    old = smtplib.SMTP(*gw.address, timeout=10)
    try:
        old.ehlo("old.client.test")

        ev = reload(gw, policy_with("example.test", "new.test"), "reloaded")
        assert ev["policy"] == str(gw.policy_path) and ev["filters"] == ["rcpt", "headers"]

        # ... new connections get the new policy: new.test is accepted and delivered.
        code, text = send(gw, "carol@new.test")
        assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
        [msg] = gw.maildir_messages()
        assert b"Delivered-To: carol@new.test\r\n" in msg

        # ... while the old connection keeps the policy it started with, for its lifetime
        # (SmtpServer fixes its engine when the connection is made): new.test is still relay.
        assert old.mail("bob@sender.test")[0] == 250
        code, text = old.rcpt("carol@new.test")
        assert code == 550 and text.decode().startswith("5.7.1 Relay access denied (")
        assert old.rcpt("alice@example.test")[0] == 250
        code, _ = old.data(b"From: bob@sender.test\r\nSubject: old\r\n\r\nold\r\n")
        assert code == 250
    finally:
        old.quit()
    ev = gw.wait_for(lambda e: e.get("event") == "message" and e["helo"] == "old.client.test")
    assert ev["rcpts"] == ["alice@example.test"] and ev["rcpt_refused"] == 1

    # An invalid file: reload-failed names every error; the previous policy stays in force.
    bad = policy_with("example.test")
    bad["limits"] = {"idle_timeout_s": 0}
    bad["colour"] = "red"
    ev = reload(gw, bad, "reload-failed")
    assert ev["level"] == "error" and ev["kept"] == "previous policy"
    assert sorted(ev["errors"]) == sorted([
        f"{gw.policy_path}: colour: unknown key",
        f"{gw.policy_path}: limits.idle_timeout_s: must be a number > 0"])
    code, text = send(gw, "dave@new.test")
    assert code == 250, text

    # A file the loader accepts but whose filters cannot be built is refused the same way.
    bad = policy_with("example.test")
    bad["filters"][0]["recipients"] = ["nobody"]
    ev = reload(gw, bad, "reload-failed")
    assert ev["errors"] == [
        f"{gw.policy_path}: filters.rcpt.recipients: 'nobody' is not an address or @domain"]
    # A file that does not parse at all.
    ev = reload(gw, "[server\n", "reload-failed")
    [err] = ev["errors"]
    assert err.startswith(f"{gw.policy_path}: TOML syntax: ")

    code, text = send(gw, "erin@new.test")
    assert code == 250, text
    assert gw.proc is not None and gw.proc.poll() is None
    assert len(gw.events("reloaded")) == 1
    assert len(gw.maildir_messages()) == 4  # carol, alice (old conn), dave, erin


def test_reload_does_not_move_listeners(gateway_factory):
    gw = gateway_factory(base_policy())
    policy = base_policy(server={"listen": [f"127.0.0.1:{free_port()}"]})
    reload(gw, policy, "reloaded")
    warning = gw.wait_for(lambda e: "listener changes need a restart" in e.get("msg", ""))
    assert warning["level"] == "warning" and "['127.0.0.1:0']" in warning["msg"]
    code, text = send(gw, "alice@example.test")  # still served on the original port
    assert code == 250, text
