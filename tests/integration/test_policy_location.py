"""Where the policy is, and what its paths mean (gateway/policy/locate.py, the loader,
``Services.path``): every subcommand finds the policy the same way (``--policy``, then
``$MAILGATE_POLICY``, then the system location, ``/etc/mailgate/mailgate.toml``, here moved
with ``$MAILGATE_SYSTEM_POLICY``, then ``./policies/default.toml``), says where it looked when
there is none, and every relative path in a policy is relative to the policy file's directory,
whatever the working directory: rule and map files, the spool, the Maildir, the Bayes store.
The shipped default policy copied alone elsewhere (as to /etc/mailgate) checks out as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gateway.qid import new_qid
from gateway.queue_entry import QueueEntry, Recipient
from gateway.spool import Spool
from tests.support import toml
from tests.support.gateway import REPO, GatewayProcess, base_policy
from tests.support.smtpclient import RawSmtpClient


def mailgate(*args: str, cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd,
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=60)


def policy_with_queued_message(path: Path) -> str:
    """Write a policy at ``path`` (spool "spool", beside it) and queue one message in that
    spool; its queue ID."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml.dumps(base_policy(relay={"mode": "queue"},
                                           spool={"directory": "spool"})))
    spool = Spool(path.parent / "spool")
    qid = new_qid()
    data = b"Subject: where\r\n\r\nbody\r\n"
    incoming = spool.incoming_path(qid)
    incoming.write_bytes(data)
    spool.commit(QueueEntry(qid=qid, sender="a@sender.test", size=len(data),
                            arrival=time.time(),
                            recipients=(Recipient(addr="b@example.test"),)), incoming,
                 "deferred")
    return qid


def test_every_subcommand_finds_the_policy_in_the_same_order(tmp_path):
    system = tmp_path / "etc" / "mailgate.toml"
    from_env = tmp_path / "env" / "env.toml"
    given = tmp_path / "given" / "given.toml"
    local = tmp_path / "work" / "policies" / "default.toml"
    qids = {p: policy_with_queued_message(p) for p in (system, from_env, given, local)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sys_env = {"MAILGATE_SYSTEM_POLICY": str(system)}

    def listed(r: subprocess.CompletedProcess[str]) -> Path:
        assert r.returncode == 0, r.stderr
        [found] = [p for p, qid in qids.items() if qid in r.stdout]
        return found

    # from a directory with no policies/: the system location
    assert listed(mailgate("queue", "list", cwd=elsewhere, env=sys_env)) == system
    r = mailgate("check-policy", cwd=elsewhere, env=sys_env)
    assert r.returncode == 0 and r.stdout.startswith(f"{system}: ok\n"), r.stderr
    r = mailgate("quarantine", "list", cwd=elsewhere, env=sys_env)
    assert r.returncode == 0 and r.stdout == "Quarantine is empty\n", r.stderr
    # $MAILGATE_POLICY before it, --policy before both
    env = {**sys_env, "MAILGATE_POLICY": str(from_env)}
    assert listed(mailgate("queue", "list", cwd=elsewhere, env=env)) == from_env
    assert listed(mailgate("queue", "--policy", str(given), "list", cwd=elsewhere,
                           env=env)) == given
    r = mailgate("check-policy", "--policy", str(given), cwd=elsewhere, env=env)
    assert r.returncode == 0 and r.stdout.startswith(f"{given}: ok\n"), r.stderr
    # no system policy: ./policies/default.toml
    absent = {"MAILGATE_SYSTEM_POLICY": str(tmp_path / "nowhere.toml")}
    assert listed(mailgate("queue", "list", cwd=local.parent.parent, env=absent)) == local
    # none at all: one line saying where it looked, exit 1, in every subcommand
    for args in (["queue", "list"], ["quarantine", "list"], ["check-policy"],
                 ["learn", "--ham", str(elsewhere)], ["run"]):
        r = mailgate(*args, cwd=elsewhere, env=absent)
        assert r.returncode == 1, (args, r.stderr)
        [line] = r.stderr.splitlines()
        assert line.endswith(f"no policy file: looked at --policy (not given), "
                             f"$MAILGATE_POLICY (not set), {tmp_path / 'nowhere.toml'} and "
                             f"./policies/default.toml (in {elsewhere}): neither exists"), line


LOCAL_RULES = """\
header RELATIVE_TEST  Subject =~ /relative-test/
score  RELATIVE_TEST  0.1
"""


def test_relative_paths_are_relative_to_the_policy_file_not_the_working_directory(tmp_path):
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    (conf / "local.cf").write_text(LOCAL_RULES)
    (conf / "users.map").write_text("carol@example.test OK\n")
    policy = base_policy("maildir:Maildir", relay={"mode": "queue"},
                         spool={"directory": "spool"}, queue={"scan_interval_s": 0.5},
                         filters=[{"name": "rcpt", "recipient_map_file": "users.map"},
                                  {"name": "rules", "files": ["local.cf"]},
                                  {"name": "bayes", "db_path": "bayes.db",
                                   "on_error": "continue"}])
    gw = GatewayProcess(elsewhere, policy, name="../conf/policy.toml")
    r = mailgate("check-policy", str(gw.policy_path), cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert f"relay: queue -> maildir:{conf / 'Maildir'}" in r.stdout
    with gw:  # started in elsewhere/
        with RawSmtpClient(gw.address, timeout=20) as c:
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<bob@sender.test>").startswith("250")
            assert c.cmd("RCPT TO:<dave@example.test>").startswith("550")  # not in the map
            assert c.cmd("RCPT TO:<carol@example.test>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            c.send(b"From: bob@sender.test\r\nSubject: relative-test\r\n\r\nhi\r\n.\r\n")
            assert c.reply().startswith("250 ")
        assert "RELATIVE_TEST(0.1)" in gw.message_event()["symbols"]
        deadline = time.monotonic() + 20
        while not gw.maildir_messages("../conf/Maildir"):
            assert time.monotonic() < deadline, "not delivered to conf/Maildir"
            time.sleep(0.05)
        assert (conf / "spool" / "gateway.lock").is_file()
        r = mailgate("queue", "--policy", "../conf/policy.toml", "list", cwd=elsewhere)
        assert r.returncode == 0, r.stderr
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@b.test\r\nSubject: learn me\r\n\r\ncheap pills\r\n")
    r = mailgate("learn", "--spam", "--policy", "../conf/policy.toml", str(msg), cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert f"store {conf / 'bayes.db'}" in r.stdout
    assert (conf / "bayes.db").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["gateway.log"]  # nothing else here


def test_the_default_policy_copied_alone_checks_out_anywhere(tmp_path):
    etc = tmp_path / "etc" / "mailgate"
    etc.mkdir(parents=True)
    shutil.copy(REPO / "policies" / "default.toml", etc / "mailgate.toml")  # nothing else
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = mailgate("check-policy", cwd=elsewhere,
                 env={"MAILGATE_SYSTEM_POLICY": str(etc / "mailgate.toml")})
    assert r.returncode == 0, r.stderr
    # left at the default: the state directory, /var/lib/mailgate for the system policy
    assert "relay: queue -> maildir:/var/lib/mailgate/Maildir" in r.stdout
    assert "  filter rules: message" in r.stdout  # the shipped rule set, from the package
    assert sorted(p.name for p in etc.iterdir()) == ["mailgate.toml"]  # a check writes nothing


def test_state_left_at_defaults_goes_to_the_state_directory_from_any_directory(tmp_path):
    """A policy that leaves the spool, the Maildir and the Bayes store at their defaults (as
    policies/default.toml does): with $MAILGATE_STATE_DIR they are there, whatever directory the
    gateway and the commands run in, so `mailgate queue list` from elsewhere sees the queue."""
    conf, state, run_dir, elsewhere = (tmp_path / d for d in ("conf", "state", "run", "else"))
    for d in (conf, run_dir, elsewhere):
        d.mkdir()
    policy = base_policy(relay={"mode": "queue"}, queue={"scan_interval_s": 0.5},
                         filters=[{"name": "bayes", "on_error": "continue"}])
    del policy["relay"]["downstream"]  # default: maildir:Maildir
    (conf / "policy.toml").write_text(toml.dumps(policy))
    env = {"MAILGATE_STATE_DIR": str(state)}
    r = mailgate("check-policy", str(conf / "policy.toml"), cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert f"relay: queue -> maildir:{state / 'Maildir'}" in r.stdout
    gw = GatewayProcess(run_dir, policy, name="../conf/policy.toml", env=env)
    with gw:
        with RawSmtpClient(gw.address, timeout=20) as c:
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<bob@sender.test>").startswith("250")
            assert c.cmd("RCPT TO:<carol@example.test>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            c.send(b"From: bob@sender.test\r\nSubject: state\r\n\r\nhi\r\n.\r\n")
            assert c.reply().startswith("250 ")
        deadline = time.monotonic() + 20
        while not list((state / "Maildir" / "new").glob("*")):
            assert time.monotonic() < deadline, "not delivered to the state directory"
            time.sleep(0.05)
        assert (state / "spool" / "gateway.lock").is_file()
        r = mailgate("queue", "--policy", str(conf / "policy.toml"), "list", cwd=elsewhere,
                     env=env)
        assert r.returncode == 0, r.stderr
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@b.test\r\nSubject: learn me\r\n\r\ncheap pills\r\n")
    r = mailgate("learn", "--spam", "--policy", str(conf / "policy.toml"), str(msg),
                 cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert (state / "bayes.db").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["gateway.log"]
    assert sorted(p.name for p in conf.iterdir()) == ["policy.toml"]
