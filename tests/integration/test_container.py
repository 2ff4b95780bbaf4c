"""The container image, built and run without a container engine: the files docker/Dockerfile
COPYs are laid out under a private root, its RUN steps that build mailgate run there (the
same docker/install.sh into a fresh virtualenv), and the gateway starts with the image's ENV,
ENTRYPOINT and CMD as a non-root user (uid 65534 standing for the image's uid), in a network
namespace of its own (``unshare -n``: the default policy's DNS lookups cannot leave the
machine). Mail sent to it lands in the Maildir under /var/lib/mailgate, the HEALTHCHECK
command says healthy while it runs and unhealthy once it is stopped, and SIGTERM drains it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_deployment_files import instructions

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
NOBODY = 65534

DRIVER = r'''
import json, os, signal, smtplib, socket, subprocess, sys, time
spec = json.loads(sys.argv[1])
out = {}

def health():
    r = subprocess.run(spec["health"], env=spec["env"], cwd=spec["workdir"],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, (r.stdout + r.stderr).strip()

s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
env = dict(spec["env"], MAILGATE_LISTEN=f"127.0.0.1:{port}")   # docker run -e MAILGATE_LISTEN=
spec["env"] = env
out["health_before"] = health()
log = open(spec["log"], "wb")
proc = subprocess.Popen(spec["as_user"] + spec["argv"], env=env, cwd=spec["workdir"],
                        stdout=log, stderr=subprocess.STDOUT)
deadline = time.monotonic() + 60
while time.monotonic() < deadline and proc.poll() is None:
    rc, text = health()
    if rc == 0:
        break
    time.sleep(0.3)
out["health_running"] = health()
try:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        out["send"] = str(c.sendmail("you@example.org", ["alice@example.test"],
                                     b"From: you@example.org\r\nTo: alice@example.test\r\n"
                                     b"Subject: container\r\nMessage-ID: <c1@example.org>\r\n"
                                     b"Date: Tue, 08 Dec 2026 00:00:00 +0000\r\n\r\nhello\r\n"))
except Exception as e:
    out["send"] = repr(e)
new = os.path.join(spec["workdir"], "Maildir", "new")
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not (os.path.isdir(new) and os.listdir(new)):
    time.sleep(0.2)
out["delivered"] = [os.path.join(new, f) for f in os.listdir(new)] if os.path.isdir(new) else []
proc.send_signal(signal.SIGTERM)
try:
    out["exit"] = proc.wait(timeout=40)
except subprocess.TimeoutExpired:
    proc.kill()
    out["exit"] = "timeout"
out["health_after"] = health()
print(json.dumps(out))
'''


def _container_path(root: Path, path: str) -> str:
    """A path inside the image, as laid out under ``root``."""
    return str(root / path.lstrip("/")) if path.startswith("/") else path


def _map_paths(root: Path, text: str) -> str:
    for top in ("/opt/mailgate", "/etc/mailgate", "/var/lib/mailgate"):
        text = text.replace(top, str(root) + top)
    return text


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


@pytest.fixture(scope="module")
def image() -> Iterator[dict]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail("unshare (util-linux) and ip (iproute2) are needed: test.sh installs them")
    root = Path(tempfile.mkdtemp(prefix="mailgate-image-"))
    root.chmod(0o755)  # the non-root user must reach the venv and the policy
    built: dict = {"root": root, "env": {}, "user": None, "workdir": "/"}
    try:
        for word, args in instructions(DOCKERFILE):
            if word == "COPY":
                *sources, dest = shlex.split(args)
                target = Path(_container_path(root, dest))
                for src in sources:
                    s = REPO / src
                    into = target / s.name if dest.endswith("/") and s.is_file() else target
                    if s.is_dir():
                        shutil.copytree(s, target if dest.endswith("/") else into,
                                        dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        into.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(s, into)
            elif word == "RUN" and "/opt/mailgate/" in args:  # the build steps
                r = subprocess.run(["/bin/sh", "-c", _map_paths(root, args)],
                                   capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, r.stdout + r.stderr
            elif word == "RUN" and "useradd" in args:  # the user: uid 65534 stands for it
                home = root / "var/lib/mailgate"
                home.mkdir(parents=True, exist_ok=True)
                os.chown(home, NOBODY, NOBODY)
                (root / "etc/mailgate").mkdir(parents=True, exist_ok=True)
            elif word == "ENV":
                for item in shlex.split(args):
                    key, _, value = item.partition("=")
                    value = value.replace("${PATH}", os.environ["PATH"])
                    built["env"][key] = _map_paths(root, value)
            elif word == "USER":
                built["user"] = args
            elif word == "WORKDIR":
                built["workdir"] = _container_path(root, args)
            elif word == "ENTRYPOINT":
                built["entrypoint"] = _exec_form(args)
            elif word == "CMD" and "entrypoint" in built:
                built["cmd"] = _exec_form(args)
            elif word == "HEALTHCHECK":
                built["health"] = _exec_form(args.split(" CMD ", 1)[1])
        for policy in (root / "etc/mailgate").rglob("*"):
            policy.chmod(0o755 if policy.is_dir() else 0o644)
        yield built
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_in_namespace(image: dict) -> dict:
    root = image["root"]
    env = {"PATH": image["env"]["PATH"], "HOME": "/nonexistent", "LANG": "C.UTF-8",
           **image["env"]}
    argv = [_map_paths(root, a) for a in image["entrypoint"] + image["cmd"]]
    health = [_map_paths(root, a) for a in image["health"]]
    spec = {"argv": argv, "health": health, "env": env, "workdir": image["workdir"],
            "log": str(root / "gateway.log"),
            "as_user": ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]}
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    r = subprocess.run(["unshare", "-n", "--", "sh", "-c",
                        'ip link set lo up && exec "$@"', "sh", sys.executable, str(driver),
                        json.dumps(spec)], capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    out["log"] = (root / "gateway.log").read_text(errors="replace")
    return out


def test_image_built_the_same_way_takes_mail_as_a_non_root_user(image: dict) -> None:
    assert image["user"] and image["user"].split(":")[0] not in ("0", "root")
    out = _run_in_namespace(image)
    log = out["log"]
    assert out["health_before"][0] == 1, out  # nothing listening yet: unhealthy
    assert out["health_running"][0] == 0, (out, log)
    assert out["send"] == "{}", (out, log)  # no refused recipient
    [delivered] = out["delivered"]
    assert os.stat(delivered).st_uid == NOBODY  # written by the unprivileged user
    assert b"Subject: container" in Path(delivered).read_bytes()
    assert out["exit"] == 0, log  # SIGTERM drains and exits cleanly
    assert out["health_after"][0] == 1
    spool = Path(image["workdir"]) / "spool"
    assert spool.is_dir() and spool.stat().st_uid == NOBODY, "spool not under /var/lib/mailgate"
    events = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    [msg] = [e for e in events if e.get("event") == "message"]  # JSON lines, as CMD asks
    assert msg["action"] == "accept", msg
