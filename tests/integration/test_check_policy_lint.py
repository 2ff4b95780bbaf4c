"""``mailgate check-policy`` and ``mailgate run`` catching mis-deployments, as a new admin meets
them: the default policy with only ``domains.accepted`` changed (the rcpt filter still lists
``@example.test``), a file with five problems (all five printed in one run), "did you mean",
the README's gateway example, and the warnings logged by ``run`` at start."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy


def mailgate(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def default_policy_copy(tmp_path: Path, edit: dict[str, str]) -> Path:
    """policies/default.toml copied as an admin would (alone: its rules ship in the package),
    with each line ``key = value`` of ``edit`` rewritten."""
    text = (REPO / "policies" / "default.toml").read_text()
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mailgate.toml"
    path.write_text(text)
    return path


def test_new_admin_changing_only_accepted_is_refused_with_the_open_domain_named(tmp_path):
    path = default_policy_copy(tmp_path, {'accepted = ["example.test"]':
                                          'accepted = ["mycorp.example"]'})
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1, r.stdout
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[0] == (
        f"{path}: filters.rcpt: example.test is not in domains.accepted: mail to it is refused "
        f"as relay (550 5.7.1) before any filter runs, so its entries never apply; add "
        f"example.test to domains.accepted, or remove them")
    assert lines[1].startswith(
        f"{path}: domains.accepted: warning: mycorp.example: no recipient filter (rcpt) lists "
        f"it, so every address @mycorp.example is accepted, unknown users too")
    assert lines[2:] == [f"{path}: 1 problem(s), 1 warning(s)"]

    # Dropping the stale entry leaves the door open: accepted, with the warning printed.
    path = default_policy_copy(tmp_path / "2", {
        'accepted = ["example.test"]': 'accepted = ["mycorp.example"]',
        'recipients = ["@example.test"]': 'recipients = []'})
    r = mailgate("check-policy", str(path), cwd=tmp_path / "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{path}: ok (1 warning(s))"
    assert r.stderr.splitlines() == [lines[1].replace(str(tmp_path / "mailgate.toml"),
                                                      str(path))]

    # Listing the users: nothing to say.
    path = default_policy_copy(tmp_path / "3", {
        'accepted = ["example.test"]': 'accepted = ["mycorp.example"]',
        'recipients = ["@example.test"]': 'recipients = ["alice@mycorp.example"]'})
    r = mailgate("check-policy", str(path), cwd=tmp_path / "3")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.splitlines()[0] == f"{path}: ok"


def test_a_file_with_five_problems_prints_all_five(tmp_path):
    path = tmp_path / "five.toml"
    path.write_text(toml.dumps(base_policy(
        server={"wrokers": 2},                                   # 1 unknown key
        limits={"max_recipients": 0, "idle_timeout_s": -1},      # 2, 3
        filters=[{"name": "rcpt", "recipients": ["nobody"]},     # 4 a filter setting
                 {"name": "headers", "strict": True}])))         # 5 another
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{path}: server.wrokers: unknown key (did you mean 'workers'?)",
        f"{path}: limits.max_recipients: must be an integer >= 1",
        f"{path}: limits.idle_timeout_s: must be a number > 0",
        f"{path}: filters.rcpt.recipients: 'nobody' is not an address or @domain",
        f"{path}: filters.headers.strict: unknown setting (known: )",
        f"{path}: 5 problem(s)",
    ]


def test_did_you_mean_for_top_level_table_and_filter_keys(tmp_path):
    path = tmp_path / "typos.toml"
    path.write_text(toml.dumps({
        **base_policy(server={"listen": ["127.0.0.1:0"], "wrokers": 1}),
        "acions": {"reject": 15},
        "filters": [{"name": "rcpt", "recipient": ["@example.test"]}],
    }))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{path}: acions: unknown key (did you mean 'actions'?)",
        f"{path}: server.wrokers: unknown key (did you mean 'workers'?)",
        f"{path}: filters.rcpt.recipient: unknown setting (did you mean 'recipients'?) (known: "
        f"domains, recipient_map_file, recipients)",
        f"{path}: 3 problem(s)",
    ]


def readme_gateway_example() -> dict[str, Any]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Making it a real gateway", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block is not None
    return tomllib.loads(block.group(1))


def test_the_readme_gateway_example_passes_check_policy_without_findings(tmp_path):
    example = readme_gateway_example()
    # every route it shows can be taken, every rcpt entry applies
    accepted = set(example["domains"]["accepted"])
    assert set(example["relay"]["transport"]) <= accepted
    # Made the way the README says: the default policy with these keys, the rcpt entry
    # replaced by the example's, and its map file listing the users.
    policy = tomllib.loads((REPO / "policies" / "default.toml").read_text())
    for table in ("server", "domains", "relay"):
        policy[table] = {**policy[table], **example[table]}
    policy["server"]["listen"] = ["127.0.0.1:0"]
    (rcpt,) = example["filters"]
    policy["filters"] = [rcpt if f["name"] == "rcpt" else f for f in policy["filters"]]
    (tmp_path / rcpt["recipient_map_file"]).write_text(
        "alice@example.com\nbob@example.com\n@example.net\n")
    path = tmp_path / "my.toml"
    path.write_text(toml.dumps(policy))
    r = mailgate("check-policy", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.splitlines()[0] == f"{path}: ok"


def open_domain_warnings(gw: GatewayProcess, domain: str) -> list[str]:
    return [rec["msg"] for rec in gw.events()
            if rec.get("level") == "warning" and f"@{domain}" in rec["msg"]]


def test_run_logs_the_warnings_at_start_and_reload(gateway_factory):
    gw = gateway_factory(base_policy(domains={"accepted": ["example.test", "open.example"]}))
    assert open_domain_warnings(gw, "open.example") == [
        f"{gw.policy_path}: domains.accepted: warning: open.example: no recipient filter "
        f"(rcpt) lists it, so every address @open.example is accepted, unknown users too; list "
        f"its users in rcpt's recipients or recipient_map_file, or \"@open.example\" to accept "
        f"the whole domain on purpose"]
    gw.write_policy(base_policy(domains={"accepted": ["example.test", "other.example"]}))
    gw.signal(signal.SIGHUP)
    gw.wait_for(lambda e: e.get("event") == "reloaded")
    assert len(open_domain_warnings(gw, "other.example")) == 1


def test_run_refuses_the_stale_recipient_list_and_says_why(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(base_policy(domains={"accepted": ["mycorp.example"]})))
    r = mailgate("run", "--policy", str(path), "--log-format", "json", cwd=tmp_path)
    assert r.returncode != 0
    records = [json.loads(line) for line in r.stderr.splitlines()]
    assert not any(rec.get("event") == "listening" for rec in records)
    assert [(rec["level"], rec["msg"].split(": ")[1]) for rec in records] == [
        ("error", "filters.rcpt"), ("warning", "domains.accepted")]
    assert "example.test is not in domains.accepted" in records[0]["msg"]
