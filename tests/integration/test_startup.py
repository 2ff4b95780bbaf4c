"""Starting ``mailgate run`` (gateway/launch.py, gateway/preflight.py): one gateway per spool (a
second one exits 1 naming the first one's PID, while the first keeps receiving and delivering,
and the spool commands keep working beside it), and every start-up problem one line naming the
file or address and the reason, exit 1: a read-only or unwritable spool, a listen port in use or
needing privilege, a missing, unreadable or broken TLS certificate or key, an unreadable rule or
map file. ``check-policy`` says the same for the spool and TLS files; a broken policy exits 1
and bad usage 2 in every subcommand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy
from tests.support.smtpclient import RawSmtpClient

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def mailgate(*args: str, cwd: Path, prefix: tuple[str, ...] = (), timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "gateway", *args], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 1 and said so on exactly one line (no traceback)."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def run_fails(policy: dict, where: Path, *, prefix: tuple[str, ...] = (),
              timeout: float = 60) -> str:
    """``mailgate run`` on ``policy`` (written to where/policy.toml): its one error line."""
    where.mkdir(parents=True, exist_ok=True)
    if prefix:
        where.chmod(0o777)  # for a run as another user
    path = where / "policy.toml"
    path.write_text(toml.dumps(policy))
    return one_line(mailgate("run", "--policy", str(path), "--log-format", "kv", cwd=where,
                             prefix=prefix, timeout=timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- one gateway per spool ----------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_gateway_on_the_same_spool_exits_1_and_the_first_keeps_delivering(
        tmp_path, workers):
    spool = tmp_path / "spool"
    policy = base_policy(f"maildir:{tmp_path / 'Maildir'}", server={"workers": workers},
                         relay={"mode": "queue"}, spool={"directory": str(spool)},
                         queue={"scan_interval_s": 0.5})
    first = GatewayProcess(tmp_path / "first", policy)
    with first, RawSmtpClient(first.address, timeout=20) as c:
        assert first.proc is not None
        # A message in the middle of its DATA (the repro: the second one's recovery deleted
        # the first one's incoming file, and the client got 451).
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<bob@sender.test>").startswith("250")
        assert c.cmd("RCPT TO:<alice@example.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(b"From: bob@sender.test\r\nSubject: in flight\r\n\r\nfirst half\r\n")
        deadline = time.monotonic() + 10
        while not list((spool / "incoming").glob("*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list((spool / "incoming").glob("*.tmp")), "DATA never reached the spool"

        # same spool, its own free port (a second gateway that starts times out here)
        line = run_fails(policy, tmp_path / "second", timeout=20)
        assert line.endswith(f" error mailgate spool {spool} is in use by pid "
                             f"{first.proc.pid}"), line
        assert list((spool / "incoming").glob("*.tmp")), "the second one touched the spool"
        assert (spool / "gateway.lock").read_text() == f"{first.proc.pid}\n"

        c.send(b"second half\r\n.\r\n")
        assert c.reply().startswith("250 2.0.0 Ok: queued as "), "the in-flight message"
        assert c.cmd("MAIL FROM:<bob@sender.test>").startswith("250")
        assert c.cmd("RCPT TO:<alice@example.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: after\r\n\r\nafter the second start\r\n.\r\n")
        assert c.reply().startswith("250 2.0.0 Ok: queued as ")
        # the spool commands work beside the running gateway, as before
        q = mailgate("queue", "--policy", str(first.policy_path), "list", cwd=tmp_path)
        assert q.returncode == 0, q.stderr
        deadline = time.monotonic() + 20
        while len(first.maildir_messages(str(tmp_path / "Maildir"))) < 2:
            assert time.monotonic() < deadline, "not delivered"
            time.sleep(0.05)
        got = b"".join(first.maildir_messages(str(tmp_path / "Maildir")))
        assert b"first half\r\nsecond half" in got and b"after the second start" in got
    # stopped: the spool is free again
    again = GatewayProcess(tmp_path / "third", policy).start()
    again.stop()


def test_the_workers_keep_the_spool_locked_while_they_drain_after_the_supervisor_died(
        tmp_path):
    """The lock belongs to the open file the workers inherit: a supervisor killed with -9
    leaves draining workers that still hold it, so no new gateway recovers under them."""
    spool = tmp_path / "spool"
    policy = base_policy(f"maildir:{tmp_path / 'Maildir'}", server={"workers": 2},
                         spool={"directory": str(spool)}, limits={"shutdown_grace_s": 30})
    gw = GatewayProcess(tmp_path / "first", policy).start()
    try:
        with RawSmtpClient(gw.address, timeout=20) as c:  # an open session keeps them draining
            c.cmd("EHLO client.test")
            c.cmd("MAIL FROM:<bob@sender.test>")
            assert gw.proc is not None
            supervisor = gw.proc.pid
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait(10)
            line = run_fails(policy, tmp_path / "second", timeout=20)
            assert line.endswith(f"spool {spool} is in use by pid {supervisor}"), line
    finally:
        gw.stop()
        for _ in range(600):  # the orphaned workers end once the session is closed
            if run_ok_briefly(policy, tmp_path / "third"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the spool stayed locked after the workers ended")


def run_ok_briefly(policy: dict, where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        GatewayProcess(where, policy).start().stop()
        return True
    except AssertionError:
        return False


# -- start-up problems: one line, exit 1 --------------------------------------------------------

def test_a_listen_port_in_use_is_one_line_naming_the_address(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        policy = base_policy(server={"listen": [f"127.0.0.1:{port}"]},
                             spool={"directory": str(tmp_path / "spool")})
        for workers in (1, 2):
            policy["server"]["workers"] = workers
            line = run_fails(policy, tmp_path / f"w{workers}")
            assert line.endswith(f" error mailgate listen 127.0.0.1:{port}: address already "
                                 "in use (another mailgate or MTA listens there?)"), line


def _nobody() -> tuple[str, ...]:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the gateway as nobody")
    return ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def test_a_privileged_port_as_non_root_is_one_line_with_the_reason(public_dir):
    floor = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if not floor.exists() or int(floor.read_text()) <= 25:
        pytest.skip("this host lets anyone bind port 25 (net.ipv4.ip_unprivileged_port_start)")
    line = run_fails(base_policy(server={"listen": ["127.0.0.1:25"]},
                                 spool={"directory": "spool"}),
                     public_dir / "p", prefix=_nobody())
    assert line.endswith(" error mailgate listen 127.0.0.1:25: permission denied: ports below "
                         "1024 need root or the CAP_NET_BIND_SERVICE capability (running as "
                         f"uid {_uid('nobody')})"), line
    assert (public_dir / "p" / "spool").is_dir()  # it got that far: the spool was fine


def test_an_unwritable_spool_is_one_line_for_run_and_check_policy(public_dir):
    root_only = public_dir / "root-only"
    root_only.mkdir(mode=0o755)
    policy = base_policy(spool={"directory": str(root_only / "spool")})
    line = run_fails(policy, public_dir / "p", prefix=_nobody())
    assert line.endswith(f" error mailgate spool directory {root_only / 'spool'}: cannot "
                         f"create in {root_only}: not writable: permission denied (uid "
                         f"{_uid('nobody')})"), line
    r = mailgate("check-policy", str(public_dir / "p" / "policy.toml"), cwd=public_dir,
                 prefix=_nobody())
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        f"{public_dir / 'p' / 'policy.toml'}: spool.directory: spool directory "
        f"{root_only / 'spool'}: cannot create in {root_only}: not writable: permission "
        f"denied (uid {_uid('nobody')})")


def _uid(user: str) -> int:
    return int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)


def _read_only(mountpoint: Path) -> tuple[str, ...]:
    """A prefix running the command in its own mount namespace where ``mountpoint`` is an
    empty read-only file system (gone with the process: nothing to clean up)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a read-only mount")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs -o ro tmpfs {mountpoint}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount in a new namespace: {probe.stderr!r}")
    return ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o ro tmpfs {mountpoint} && exec "$@"', "sh")


def test_a_read_only_spool_is_one_line_for_run_and_check_policy(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only(ro)
    policy = base_policy(spool={"directory": str(ro / "spool")})
    line = run_fails(policy, tmp_path / "p", prefix=prefix)
    assert line.endswith(f" error mailgate spool directory {ro / 'spool'}: cannot create in "
                         f"{ro}: not writable: read-only file system"), line
    r = mailgate("check-policy", str(tmp_path / "p" / "policy.toml"), cwd=tmp_path,
                 prefix=prefix)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[0] == (
        f"{tmp_path / 'p' / 'policy.toml'}: spool.directory: spool directory {ro / 'spool'}: "
        f"cannot create in {ro}: not writable: read-only file system")
    # an existing spool on a file system that became read-only: the same, for the directory
    prefix = prefix[:-2] + (f"mount -t tmpfs tmpfs {ro} && mkdir {ro}/spool && "
                            f'mount -o remount,ro {ro} && exec "$@"', "sh")
    line = run_fails(policy, tmp_path / "p", prefix=prefix)
    assert line.endswith(f" error mailgate spool directory {ro / 'spool'}: not writable: "
                         "read-only file system"), line


def make_cert(d: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed: cannot make a test certificate")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=mx.gateway.test", "-days", "1",
                    "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    crt.chmod(0o644)
    return crt, key


def test_tls_files_missing_unreadable_or_broken_are_one_line(tmp_path, public_dir):
    cert, key = make_cert(public_dir)
    spool = {"directory": str(public_dir / "spool")}
    missing = public_dir / "missing.pem"
    line = run_fails(base_policy(tls={"cert_file": str(cert), "key_file": str(missing)},
                                 spool=spool), tmp_path / "a")
    assert line.endswith(f"policy.toml: tls.key_file: no such file: {missing}"), line
    garbage = public_dir / "garbage.pem"
    garbage.write_text("not a key\n")
    line = run_fails(base_policy(tls={"cert_file": str(cert), "key_file": str(garbage)},
                                 spool=spool), tmp_path / "b")
    assert line.endswith(f"policy.toml: tls.key_file: {garbage} holds no PEM private key"), line
    for workers in (1, 2):  # the supervisor checks before forking
        key.chmod(0o600)  # root's: nobody cannot read it
        line = run_fails(base_policy(tls={"cert_file": str(cert), "key_file": str(key)},
                                     server={"workers": workers}, spool=spool),
                         public_dir / f"c{workers}", prefix=_nobody())
        assert line.endswith(f"policy.toml: tls.key_file: cannot read {key}: Permission "
                             "denied"), line


def test_unreadable_rule_and_map_files_are_one_line(tmp_path):
    spool = {"directory": str(tmp_path / "spool")}
    line = run_fails(base_policy(filters=[{"name": "rules", "files": ["missing.cf"]}],
                                 spool=spool), tmp_path / "a")
    assert line.endswith(f"policy.toml: filters.rules.files: missing.cf: cannot read "
                         f"{tmp_path / 'a' / 'missing.cf'}: No such file or directory"), line
    (tmp_path / "b" / "users.map").mkdir(parents=True)  # a directory: unreadable as a file
    line = run_fails(base_policy(filters=[{"name": "rcpt", "recipient_map_file": "users.map"}],
                                 spool=spool), tmp_path / "b")
    assert line.endswith(f"policy.toml: filters.rcpt.recipient_map_file: cannot read "
                         f"{tmp_path / 'b' / 'users.map'}: Is a directory"), line
    assert not (tmp_path / "spool").exists()  # a policy that does not load leaves no trace


# -- one meaning of the exit code ---------------------------------------------------------------

def test_a_broken_policy_exits_1_and_bad_usage_2_in_every_subcommand(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.dumps(base_policy(limits={"idle_timeout_s": -1},
                                          spool={"directory": "spool"})))
    (tmp_path / "spool").mkdir()
    (tmp_path / "m.eml").write_bytes(b"Subject: x\r\n\r\nx\r\n")
    problem = f"{bad}: limits.idle_timeout_s: must be a number > 0"
    for args in (["run", "--policy", str(bad)], ["check-policy", str(bad)],
                 ["queue", "--policy", str(bad), "list"],
                 ["quarantine", "--policy", str(bad), "list"],
                 ["learn", "--spam", "--policy", str(bad), str(tmp_path / "m.eml")],
                 ["health", "--policy", str(bad)]):
        r = mailgate(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        assert problem in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    for args in (["run", "--no-such-option"], ["check-policy", "a", "b"],
                 ["queue", "list", "--frobnicate"], ["quarantine", "show", "not-a-qid"],
                 ["learn", "--spam"], ["no-such-command"]):
        r = mailgate(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("usage: mailgate"), (args, r.stderr)
