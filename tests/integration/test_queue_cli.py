"""``mailgate queue`` (gateway/queuecli.py) as a subprocess on a spool built with gateway.spool:
list/show and their JSON, hold/release/delete/flush as seen on disk, a message claimed by
another process (busy, exit 1; ``--wait``), unknown queue IDs, usage and policy errors; and
against a live gateway in queue mode: a deferred message shown with its error, flushed, and
delivered within the scan interval instead of the 30 s backoff."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, queuecli
from gateway.qid import new_qid
from gateway.queue_entry import Area, QueueEntry, Recipient
from gateway.spool import Spool
from tests.support import toml
from tests.support.gateway import REPO, base_policy
from tests.support.sink import Sink

QID_RE = re.compile(r"queued as ([0-9A-Z]{16})")


def mailgate(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", "queue", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class Queue:
    """A work directory with policy.toml (spool.directory = "spool", relative like the shipped
    policies) and the Spool it names; ``run`` is the CLI in that directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "policy.toml").write_text(toml.dumps(base_policy(
            relay={"mode": "queue"}, spool={"directory": "spool"},
            queue={"scan_interval_s": 0.5})))
        self.spool = Spool(root / "spool")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return mailgate(self.root, "--policy", "policy.toml", *args)

    def add(self, area: Area = "deferred", data: bytes | None = None, **kw: Any) -> QueueEntry:
        qid = new_qid()
        data = data if data is not None else (
            b"From: a@sender.test\r\nSubject: " + qid.encode() + b"\r\n\r\nbody\r\n")
        path = self.spool.incoming_path(qid)
        path.write_bytes(data)
        fields: dict[str, Any] = {
            "qid": qid, "sender": "a@sender.test", "size": len(data), "arrival": time.time(),
            "recipients": (Recipient(addr="b@example.test"),), "client_ip": "192.0.2.7",
            "helo": "client.sender.test", "decision": {"action": "accept", "score": 1.5}}
        if area == "deferred":
            fields.update(attempts=1, next_attempt=time.time() + 3630,
                          last_error="smtp:127.0.0.1:9: connection refused")
        entry = QueueEntry(**{**fields, **kw})
        self.spool.commit(entry, path, area)
        return entry

    def where(self, qid: str) -> list[str]:
        """The areas holding metadata for ``qid`` (exactly one for a consistent spool)."""
        return [a for a in ("active", "deferred", "hold")
                if (self.spool.root / a / f"{qid}.json").exists()]

    def data_exists(self, qid: str) -> bool:
        return (self.spool.root / "data" / qid).exists()


@pytest.fixture
def q(tmp_path: Path) -> Queue:
    return Queue(tmp_path)


# -- list and show -----------------------------------------------------------------------------

def test_list_like_mailq(q: Queue) -> None:
    active = q.add("active", data=b"x" * 3000)
    deferred = q.add("deferred", recipients=(
        Recipient(addr="b@example.test", state="pending", attempts=1,
                  last_reply="451 4.4.1 connection refused"),
        Recipient(addr="c@example.test", state="delivered", attempts=1,
                  last_reply="250 2.0.0 Ok: queued as 1")))
    held = q.add("hold", sender="")
    r = q.run("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-") and "Sender/Recipient" in lines[0]
    # one block per message, oldest first; * = active, ! = hold, blank = deferred
    assert re.match(rf"^{active.qid}\* +3000 \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d +"
                    r"a@sender\.test$", lines[1])
    assert lines[2] == "        b@example.test  pending"
    block = r.stdout.split("\n\n")
    assert block[1].splitlines()[0].startswith(f"{deferred.qid}  ")
    assert block[1].splitlines()[1:] == [
        "        (1 attempt, next in 1h00m: smtp:127.0.0.1:9: connection refused)",
        "        b@example.test  pending: 451 4.4.1 connection refused",
        "        c@example.test  delivered: 250 2.0.0 Ok: queued as 1"]
    assert block[2].splitlines()[0].startswith(f"{held.qid}!")
    assert block[2].splitlines()[0].endswith(" <>")  # the null sender
    assert block[2].splitlines()[1] == "        (on hold, 0 attempts)"
    total = active.size + deferred.size + held.size
    assert lines[-1] == f"-- {-(-total // 1024)} KiB in 3 messages"

    r = q.run("list", "--area", "hold")
    assert held.qid in r.stdout and active.qid not in r.stdout and deferred.qid not in r.stdout
    assert r.stdout.splitlines()[-1].endswith("KiB in 1 message")


def test_list_json_has_every_field(q: Queue) -> None:
    entry = q.add("deferred", mail_params=("BODY=8BITMIME",), envid="e1", ret="HDRS",
                  recipients=(Recipient(addr="b@example.test", notify=frozenset({"FAILURE"}),
                                        orcpt="rfc822;b@example.test", attempts=1,
                                        last_reply="451 4.4.1 refused",
                                        remote_mta="mx.example.test"),))
    q.add("hold")
    r = q.run("list", "--json", "--area", "deferred")
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)
    assert obj == {
        "qid": entry.qid, "area": "deferred", "sender": "a@sender.test",
        "envid": "e1", "ret": "HDRS", "arrival": entry.arrival, "size": entry.size,
        "decision": {"action": "accept", "score": 1.5}, "attempts": 1,
        "next_attempt": entry.next_attempt, "last_error": entry.last_error,
        "client_ip": "192.0.2.7", "helo": "client.sender.test", "delay_warned": None,
        "mail_params": ["BODY=8BITMIME"], "prepend": "", "skip": 0,
        "recipients": [{"addr": "b@example.test", "notify": ["FAILURE"],
                        "orcpt": "rfc822;b@example.test", "state": "pending",
                        "last_reply": "451 4.4.1 refused", "attempts": 1,
                        "remote_mta": "mx.example.test"}],
        "arrival_iso": obj["arrival_iso"], "next_attempt_iso": obj["next_attempt_iso"],
        "due": False}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", obj["arrival_iso"])
    assert [o["area"] for o in json.loads(q.run("list", "--json").stdout)] == ["deferred",
                                                                               "hold"]


def test_empty_queue(q: Queue) -> None:
    r = q.run("list")
    assert (r.returncode, r.stdout) == (0, "Mail queue is empty\n")
    assert json.loads(q.run("list", "--json").stdout) == []


def test_show_text_json_and_body(q: Queue) -> None:
    data = b"From: a@sender.test\r\nSubject: caf\xc3\xa9 \xff\r\n\r\n8-bit body \x80\r\n"
    entry = q.add("deferred", data=data, prepend=b"X-Spam-Score: 1.5\r\n")
    r = q.run("show", entry.qid.lower())  # queue IDs are case-insensitive
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for expected in (f"qid:          {entry.qid}", "area:         deferred",
                     f"size:         {len(data)} bytes + 19 bytes of headers to prepend",
                     "sender:       <a@sender.test>", "client:       192.0.2.7 (helo "
                     "client.sender.test)", "decision:     action=accept score=1.5",
                     "attempts:     1", "last error:   smtp:127.0.0.1:9: connection refused",
                     "recipients:", "  b@example.test  pending  attempts=0"):
        assert expected in text.splitlines(), (expected, text)
    assert re.search(r"^next attempt: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \(in 1h00m\)$",
                     text, re.M)
    assert "-- message" not in text

    raw = subprocess.run([sys.executable, "-m", "gateway", "queue", "--policy", "policy.toml",
                          "show", entry.qid, "--body"], cwd=q.root, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert raw.returncode == 0
    head, sep, body = raw.stdout.partition(
        f"-- message: {19 + len(data)} bytes, as it will be relayed --\n".encode())
    assert sep and head.startswith(b"qid:")
    assert body == b"X-Spam-Score: 1.5\r\n" + data  # exactly the bytes, 8-bit included

    obj = json.loads(q.run("show", entry.qid, "--json", "--body").stdout)
    assert obj["qid"] == entry.qid and obj["area"] == "deferred"
    assert obj["prepend"] == "X-Spam-Score: 1.5\r\n"
    assert base64.b64decode(obj["message_base64"]) == b"X-Spam-Score: 1.5\r\n" + data
    assert "message_base64" not in json.loads(q.run("show", entry.qid, "--json").stdout)


# -- changes -----------------------------------------------------------------------------------

def test_hold_and_release(q: Queue) -> None:
    entry = q.add("deferred")
    r = q.run("hold", entry.qid)
    assert (r.returncode, r.stdout) == (0, f"{entry.qid}: held (deferred -> hold)\n")
    assert q.where(entry.qid) == ["hold"] and q.data_exists(entry.qid)
    assert "queue-change action=hold" in r.stderr  # the log line
    _, held = q.spool.load(entry.qid)
    assert held == entry  # metadata unchanged: only the area
    r = q.run("hold", entry.qid)
    assert (r.returncode, r.stdout) == (0, f"{entry.qid}: already on hold\n")

    before = time.time()
    r = q.run("release", entry.qid)
    assert (r.returncode, r.stdout) == (0, f"{entry.qid}: released (hold -> active)\n")
    area, released = q.spool.load(entry.qid)
    assert area == "active" and q.where(entry.qid) == ["active"]
    assert before <= released.next_attempt <= time.time()  # due now
    assert released.attempts == entry.attempts and released.last_error == entry.last_error
    r = q.run("release", entry.qid)
    assert r.returncode == 0 and "not on hold (in active/), nothing to do" in r.stdout


def test_flush_one_and_all(q: Queue) -> None:
    one, two = q.add("deferred"), q.add("deferred")
    held, fresh = q.add("hold"), q.add("active")
    before = time.time()
    r = q.run("flush", one.qid)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"{one.qid}: flushed (deferred -> active)",
        "-- a running gateway delivers within its scan interval (queue.scan_interval_s = 0.5s)"]
    area, e = q.spool.load(one.qid)
    assert area == "active" and before <= e.next_attempt <= time.time()
    assert q.where(two.qid) == ["deferred"]

    r = q.run("flush")  # every deferred message; held ones stay held
    assert r.returncode == 0, r.stderr
    assert f"{two.qid}: flushed (deferred -> active)" in r.stdout
    assert "-- flushed 1 deferred message\n" in r.stdout
    assert q.where(two.qid) == ["active"] and q.where(held.qid) == ["hold"]
    assert q.where(fresh.qid) == ["active"]
    assert q.spool.due(time.time(), 10) == sorted([one.qid, two.qid, fresh.qid])

    later = q.add("active", next_attempt=time.time() + 600)  # active but not due: made due
    r = q.run("flush", later.qid)
    assert r.returncode == 0 and f"{later.qid}: flushed (already active, due now)" in r.stdout
    assert q.spool.load(later.qid)[1].next_attempt <= time.time()

    r = q.run("flush", held.qid)
    assert r.returncode == 1
    assert f"{held.qid}: on hold: `mailgate queue release {held.qid}` to deliver it" in r.stderr
    assert q.where(held.qid) == ["hold"]


def test_delete(q: Queue) -> None:
    keep_active, keep_held = q.add("active"), q.add("hold")
    gone = q.add("deferred", recipients=(Recipient(addr="b@example.test"),
                                          Recipient(addr="c@example.test")))
    r = q.run("delete", gone.qid)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"{gone.qid}: deleted from deferred/ ({gone.size} bytes, from "
                        "a@sender.test, to b@example.test, c@example.test; 2 recipients "
                        "undelivered)\n")
    # the log line says what was deleted
    log = next(ln for ln in r.stderr.splitlines() if "queue-change" in ln)
    for field in ("action=delete", f"qid={gone.qid}", "area=deferred", "sender=a@sender.test",
                  "rcpts=b@example.test,c@example.test", f"size={gone.size}",
                  'last_error="smtp:127.0.0.1:9: connection refused"'):
        assert field in log, (field, log)
    assert q.where(gone.qid) == [] and not q.data_exists(gone.qid)

    d1, d2 = q.add("deferred"), q.add("deferred")
    r = q.run("--log-format", "json", "delete", "--all-deferred")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "-- deleted 2 deferred messages"
    logged = [json.loads(ln) for ln in r.stderr.splitlines()]
    assert [(x["event"], x["action"], x["qid"]) for x in logged] == [
        ("queue-change", "delete", d1.qid), ("queue-change", "delete", d2.qid)]
    for e in (d1, d2):
        assert q.where(e.qid) == [] and not q.data_exists(e.qid)
    assert q.where(keep_active.qid) == ["active"] and q.where(keep_held.qid) == ["hold"]
    assert sorted(os.listdir(q.spool.root / "data")) == sorted([keep_active.qid, keep_held.qid])
    r = q.run("delete", keep_held.qid)  # any area
    assert r.returncode == 0 and q.where(keep_held.qid) == []


@pytest.mark.parametrize("args", [("hold",), ("release",), ("delete",), ("flush",)])
def test_busy_message_is_left_alone(q: Queue, args: tuple[str, ...]) -> None:
    entry = q.add("hold" if args == ("release",) else "deferred")
    area = q.where(entry.qid)
    with q.spool.claim(entry.qid):  # as the gateway's queue manager does while delivering
        r = q.run(*args, entry.qid)
        assert r.returncode == 1
        assert (f"{entry.qid}: busy: being delivered right now (or changed by another "
                "mailgate process); try again, or use --wait") in r.stderr
        assert q.where(entry.qid) == area and q.data_exists(entry.qid)
        if args == ("flush",):  # in bulk too: the others are done, exit 1
            other = q.add("deferred")
            r = q.run("flush")
            assert r.returncode == 1 and "-- flushed 1 deferred message (1 busy)" in r.stdout
            assert q.where(other.qid) == ["active"] and q.where(entry.qid) == ["deferred"]


def test_wait_for_a_busy_message(q: Queue) -> None:
    entry = q.add("deferred")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with q.spool.claim(entry.qid):
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "queue", "--policy",
                                 "policy.toml", "hold", "--wait", entry.qid], cwd=q.root,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(1.0)
        assert proc.poll() is None  # blocked on the claim
        assert q.where(entry.qid) == ["deferred"]
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == f"{entry.qid}: held (deferred -> hold)\n"
    assert q.where(entry.qid) == ["hold"]


def test_unknown_and_malformed_queue_ids(q: Queue) -> None:
    q.add("deferred")
    missing = new_qid()
    for cmd in ("show", "flush", "delete", "hold", "release"):
        r = q.run(cmd, missing)
        assert r.returncode == 1, (cmd, r)
        assert f"{missing}: not in the queue (never queued, delivered, or deleted)" in r.stderr
    r = q.run("hold", "NOT-A-QID")
    assert r.returncode == 2 and "not a queue ID: 'NOT-A-QID'" in r.stderr


def test_usage_and_policy_errors(q: Queue, tmp_path: Path) -> None:
    r = q.run("delete")
    assert r.returncode == 2 and "give QID... or --all-deferred" in r.stderr
    r = q.run("delete", new_qid(), "--all-deferred")
    assert r.returncode == 2
    r = q.run("frobnicate")
    assert r.returncode == 2
    # a bad policy or spool is exit 1 (as in every subcommand), bad usage 2
    r = mailgate(q.root, "--policy", "nope.toml", "list")
    assert r.returncode == 1 and "nope.toml: cannot read" in r.stderr
    (q.root / "bad.toml").write_text('[relay]\nmode = "carrier-pigeon"\n')
    r = mailgate(q.root, "--policy", "bad.toml", "list")
    assert r.returncode == 1 and "relay.mode" in r.stderr
    (q.root / "sub").mkdir()  # its relative spool "spool" is sub/spool, which does not exist
    (q.root / "sub" / "p.toml").write_text(toml.dumps(base_policy(spool={"directory": "spool"})))
    r = mailgate(tmp_path, "--policy", str(q.root / "sub" / "p.toml"), "list")
    assert r.returncode == 1
    assert f"spool directory {q.root / 'sub' / 'spool'} does not exist" in r.stderr
    assert not (q.root / "sub" / "spool").exists()  # not created by a look
    # --policy is accepted after the subcommand too
    assert mailgate(q.root, "list", "--policy", "policy.toml").returncode == 0


def test_unreadable_metadata_is_skipped_and_reported(q: Queue) -> None:
    good = q.add("deferred")
    bad = new_qid()
    (q.spool.root / "data" / bad).write_bytes(b"x")
    (q.spool.root / "deferred" / f"{bad}.json").write_text("{not json")
    r = q.run("list")
    assert r.returncode == 0 and good.qid in r.stdout and bad not in r.stdout
    assert f"skipping unreadable deferred/{bad}.json" in r.stderr
    r = q.run("show", bad)
    assert r.returncode == 1 and f"{bad}: unreadable" in r.stderr


def test_changes_refused_for_another_user(q: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root running `queue hold` would leave root-owned 0600 metadata the gateway cannot read."""
    entry = q.add("deferred")
    owner = q.spool.root.stat().st_uid
    monkeypatch.chdir(q.root)
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    out, err = io.StringIO(), io.StringIO()
    args = cli.build_parser().parse_args(["queue", "--policy", "policy.toml", "hold",
                                          entry.qid])
    assert queuecli.run(args, out, err) == 1
    assert f"belongs to uid {owner}" in err.getvalue()
    assert "run queue changes as that user" in err.getvalue()
    assert q.where(entry.qid) == ["deferred"]
    args = cli.build_parser().parse_args(["queue", "--policy", "policy.toml", "list"])
    assert queuecli.run(args, out, err) == 0 and entry.qid in out.getvalue()  # reads are fine


# -- with a running gateway --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flush_delivers_a_deferred_message_through_the_running_gateway(gateway_factory):
    port = _free_port()  # nothing listens there yet: the downstream is down
    gw = gateway_factory(base_policy(
        f"smtp://127.0.0.1:{port}", relay={"mode": "queue"},
        queue={"min_backoff_s": 30, "max_backoff_s": 60, "scan_interval_s": 0.2}))
    with smtplib.SMTP(*gw.address, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@sender.test")[0] == 250
        assert client.rcpt("b@example.test")[0] == 250
        code, text = client.data(b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: "
                                 b"queued\r\nMessage-ID: <1@sender.test>\r\n\r\nhello\r\n")
    assert code == 250, text
    m = QID_RE.search(text.decode())
    assert m, text
    qid = m[1]
    gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid
                and e.get("outcome") == "deferred")

    r = mailgate(gw.workdir, "--policy", "policy.toml", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(qid))
    assert lines[i].startswith(f"{qid} ") and lines[i].endswith(" a@sender.test")
    assert re.match(r" {8}\(1 attempt, next in \d+s: .*127\.0\.0\.1.*\)$", lines[i + 1]), lines
    assert lines[i + 2].startswith("        b@example.test  pending: 4")
    (obj,) = json.loads(mailgate(gw.workdir, "--policy", "policy.toml", "list",
                                 "--json").stdout)
    assert obj["qid"] == qid and obj["area"] == "deferred" and obj["last_error"]
    assert obj["next_attempt"] - time.time() > 20  # 30 s backoff: not due by itself

    with Sink(port=port) as sink:
        time.sleep(0.5)  # several scans: the gateway does not retry before its backoff
        assert sink.messages == []
        r = mailgate(gw.workdir, "--policy", "policy.toml", "flush")
        assert r.returncode == 0, r.stderr
        assert f"{qid}: flushed (deferred -> active)" in r.stdout
        start = time.monotonic()
        (msg,) = sink.wait_for(1, timeout_s=3)
        assert time.monotonic() - start < 2.0
    assert msg.mail_from == "a@sender.test" and msg.rcpts == ("b@example.test",)
    assert b"Subject: queued" in msg.data
    gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid
                and e.get("outcome") == "done")
    r = mailgate(gw.workdir, "--policy", "policy.toml", "list")
    assert r.stdout == "Mail queue is empty\n"
