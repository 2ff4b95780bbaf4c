"""Static checks of the deployment files: hadolint on every Dockerfile, the compose file against
the Compose Specification's JSON schema (tests/support/compose_spec), systemd-analyze on the
systemd unit, and the promises the docs make about them (non-root, a health check, a stop
timeout above the drain time, port 25 without root)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from gateway.policy.schema import Limits

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (the test extra installs it)")
    return str(path)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    r = subprocess.run([_tool("hadolint"), "--no-color", str(dockerfile)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_would_catch_a_finding(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y postfix\n")
    r = subprocess.run([_tool("hadolint"), "--no-color", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "DL3007" in r.stdout  # "latest" is not a pinned base


def _compose_errors(text: str) -> list[str]:
    import jsonschema

    schema = json.loads((REPO / "tests" / "support" / "compose_spec" / "schema.json")
                        .read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(yaml.safe_load(text))]


def test_compose_file_follows_the_compose_spec() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert _compose_errors(text) == []
    # the check does catch a misspelt key
    assert _compose_errors(text.replace("stop_grace_period:", "stop_grace_perod:"))


def test_gateway_image_runs_as_documented() -> None:
    ins = instructions(DOCKER / "Dockerfile")
    words = [w for w, _ in ins]
    base = dict(ins)["FROM"]
    assert ":" in base and not base.endswith(":latest") and base.count(".") >= 2, \
        f"base image not pinned to a release: {base}"
    user = [a for w, a in ins if w == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in words and "mailgate\", \"health" in dict(ins)["HEALTHCHECK"]
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "MAILGATE_LISTEN=0.0.0.0:2525" in env  # reachable whatever policy is mounted
    assert "MAILGATE_STATE_DIR=/var/lib/mailgate" in env  # the CLIs find the spool too
    assert not any("sed " in a for w, a in ins if w == "RUN"), "policy edited at build time"


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def test_compose_gateway_is_wired_to_its_policy() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    gw = compose["services"]["mailgate"]
    policy_path = gw["environment"]["MAILGATE_POLICY"]
    assert policy_path in gw["command"] and policy_path in gw["healthcheck"]["test"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    host_dir = (DOCKER / mounted["/etc/mailgate"]).resolve()
    policy = tomllib.loads((host_dir / Path(policy_path).name).read_text())
    grace = policy.get("limits", {}).get("shutdown_grace_s", Limits().shutdown_grace_s)
    assert _seconds(gw["stop_grace_period"]) > grace
    assert policy["relay"]["downstream"].startswith("smtp://downstream:")
    assert {"downstream", "clamav"} <= set(compose["services"])
    clamav = [f for f in policy["filters"] if f["name"] == "clamav"]
    assert clamav and clamav[0]["address"].startswith("clamav:")
    assert "/var/lib/mailgate" in mounted


# -- the systemd unit (docs/examples/mailgate.service) ------------------------------------------

UNIT = REPO / "docs" / "examples" / "mailgate.service"


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_verifies_clean(tmp_path: Path) -> None:
    """systemd-analyze reads it without a warning (an unknown key, a bad value) once its
    binary exists: here, this checkout's own mailgate."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing (Debian's systemd package)")
    unit = tmp_path / "mailgate.service"
    unit.write_text(UNIT.read_text().replace("/opt/mailgate/venv/bin/mailgate",
                                             str(BIN / "mailgate")))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    bad = tmp_path / "bad" / "mailgate.service"  # it would see a misspelt key
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    r = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True,
                       timeout=60, env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"})
    assert "Unknown key" in r.stdout + r.stderr


def test_systemd_unit_binds_port_25_unprivileged_and_outlasts_the_drain() -> None:
    s = _unit_settings()
    assert s["User"] != ["root"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert float(s["TimeoutStopSec"][0]) > Limits().shutdown_grace_s
    assert s["KillSignal"] == ["SIGTERM"]
    assert any("check-policy" in x for x in s["ExecStartPre"])


def test_compose_policy_runs_the_default_chain_and_scores() -> None:
    """policies/compose.toml is the default policy placed in containers: the same filters in
    the same order (plus clamd) and the same scores, so the two cannot drift apart."""
    default = tomllib.loads((REPO / "policies" / "default.toml").read_text())
    compose = tomllib.loads((REPO / "policies" / "compose.toml").read_text())
    names = [f["name"] for f in compose["filters"]]
    assert [n for n in names if n != "clamav"] == [f["name"] for f in default["filters"]]
    assert compose["scores"] == default["scores"]
    from gateway.policy.loader import load_policy

    assert (load_policy(REPO / "policies" / "compose.toml").default_class.thresholds
            == load_policy(REPO / "policies" / "default.toml").default_class.thresholds)
