"""The quarantine end to end, in queue and proxy mode: a rule quarantines a message (no Date:
header) → the client gets 250, nothing reaches the downstream sink; `mailgate quarantine list`
(the real CLI, a subprocess) shows it with its symbols and reason; `release` delivers exactly the
stored bytes to the original recipients (DSN parameters kept) through the queue; `delete`
removes it; expiry (automatic, and `expire`) removes old ones; a quarantine that cannot be
written answers 451, never 250."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import REPO, GatewayProcess, base_policy
from tests.support.sink import DEFAULT_EXTENSIONS, Sink

SENDER = "bob@sender.test"
ALICE = "alice@example.test"
CAROL = "carol@example.test"
NO_DATE = (b"From: Bob <bob@sender.test>\r\n"
           b"To: Alice <alice@example.test>\r\n"
           b"Message-ID: <quarantine-test@sender.test>\r\n"
           b"Subject: quarantine me\r\n"
           b"\r\n"
           b"first line\r\n"
           b".a line that starts with a dot\r\n")
WITH_DATE = NO_DATE.replace(b"Subject:", b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nSubject:")
MODES = ("queue", "proxy")


def policy(sink: Sink, mode: str, **quarantine: Any) -> dict[str, Any]:
    return base_policy(
        downstream=f"smtp://127.0.0.1:{sink.port}", relay={"mode": mode},
        spool={"directory": "spool"}, queue={"scan_interval_s": 0.2},
        quarantine={"retention_s": 3600, "expire_interval_s": 0.2, **quarantine},
        scores={"HEADERS_MISSING_DATE": 1.0},
        rules=[{"name": "no-date", "if_any": ["HEADERS_MISSING_DATE"],
                "action": "quarantine"}])


def dsn_sink() -> Sink:
    return Sink(ehlo_extensions=(*DEFAULT_EXTENSIONS, "DSN"))


def mailgate(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gateway", "quarantine", *args, "--policy",
                           str(gw.policy_path)], cwd=gw.workdir, env=env, capture_output=True,
                          timeout=30)


def listed(gw: GatewayProcess, *args: str) -> list[dict[str, Any]]:
    res = mailgate(gw, "list", "--json", *args)
    assert res.returncode == 0, res.stderr
    out: list[dict[str, Any]] = json.loads(res.stdout)
    return out


def send(gw: GatewayProcess, message: bytes = NO_DATE) -> tuple[int, str]:
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER, ["RET=HDRS", "ENVID=env-1"])[0] == 250
        assert s.rcpt(ALICE, ["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{ALICE}"])[0] == 250
        assert s.rcpt(CAROL)[0] == 250
        code, text = s.data(message)
    return code, text.decode()


def spool_files(gw: GatewayProcess, area: str) -> list[str]:
    d = gw.workdir / "spool" / area
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("mode", MODES)
def test_quarantined_then_listed_shown_and_released(gateway_factory, mode):
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, mode))
        code, text = send(gw)
        assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
        qid = text.rsplit(" ", 1)[1]
        ev = gw.message_event(qid)
        assert ev["action"] == "quarantine" and ev["by"] == "rule:no-date"
        assert ev["relay"] == "quarantined"
        q_ev = gw.wait_for(lambda e: e.get("event") == "quarantine" and e.get("qid") == qid)
        assert q_ev["by"] == "rule:no-date" and q_ev["rcpts"] == [ALICE, CAROL]
        assert spool_files(gw, "hold") == [f"{qid}.json"]
        time.sleep(0.6)  # three queue scans: a quarantined message is never delivered
        assert sink.messages == []

        [row] = listed(gw)
        assert row["qid"] == qid and row["reason"] == "rule:no-date"
        assert row["sender"] == SENDER and row["recipients"] == [ALICE, CAROL]
        assert row["subject"] == "quarantine me"
        assert row["message_id"] == "<quarantine-test@sender.test>"
        assert any(s["name"] == "HEADERS_MISSING_DATE" and s["score"] == 1.0
                   for s in row["symbols"]), row["symbols"]
        assert row["score"] >= 1.0 and row["policy_class"] == "default"
        assert row["client_ip"] == "127.0.0.1" and row["helo"] == "client.test"
        assert listed(gw, "--rcpt", "CAROL@") and not listed(gw, "--rcpt", "dave")
        assert listed(gw, "--sender", "sender.test", "--since", "5m")
        assert not listed(gw, "--since", "2999-01-01")

        text_list = mailgate(gw, "list")
        assert text_list.returncode == 0
        out = text_list.stdout.decode()
        assert qid in out and "rule:no-date" in out and "HEADERS_MISSING_DATE(1)" in out

        show = mailgate(gw, "show", qid.lower())
        assert show.returncode == 0, show.stderr
        out = show.stdout.decode()
        assert "reason:       rule:no-date" in out and f"<{SENDER}>" in out
        assert "notify=DELAY,FAILURE" in out and "Subject: quarantine me" in out
        assert "first line" not in out  # headers only without --raw
        raw = mailgate(gw, "show", qid, "--raw")
        assert raw.returncode == 0 and raw.stdout.endswith(NO_DATE)
        assert raw.stdout.startswith(b"Received: from client.test")
        assert b"X-Spam-Status: Yes" in raw.stdout and b"action=quarantine" in raw.stdout

        rel = mailgate(gw, "release", qid)
        assert rel.returncode == 0, rel.stderr
        assert f"{qid}: released to the queue" in rel.stdout.decode()
        assert b"quarantine-release" in rel.stderr and qid.encode() in rel.stderr
        [msg] = sink.wait_for(1, timeout_s=10)
    assert msg.data == raw.stdout  # exactly the stored bytes, our headers included
    assert msg.mail_from == SENDER and msg.rcpts == (ALICE, CAROL)
    assert "RET=HDRS" in msg.mail_params and "ENVID=env-1" in msg.mail_params
    assert set(msg.rcpt_params[0]) == {"NOTIFY=DELAY,FAILURE", f"ORCPT=rfc822;{ALICE}"}
    assert listed(gw) == []
    assert spool_files(gw, "hold") == []
    gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid
                and e.get("outcome") == "done")
    assert mailgate(gw, "release", qid).returncode == 1  # gone from the quarantine


@pytest.mark.parametrize("mode", MODES)
def test_delete_and_accepted_mail_is_not_quarantined(gateway_factory, mode):
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, mode))
        assert send(gw, WITH_DATE)[0] == 250
        sink.wait_for(1)
        code, text = send(gw)
        qid = text.rsplit(" ", 1)[1]
        assert code == 250 and [r["qid"] for r in listed(gw)] == [qid]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        queue_release = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", "release", qid, "--policy",
             str(gw.policy_path)], cwd=gw.workdir, env=env, capture_output=True, timeout=30)
        assert queue_release.returncode == 1
        assert f"mailgate quarantine release {qid}".encode() in queue_release.stderr
        assert spool_files(gw, "hold") == [f"{qid}.json"]
        res = mailgate(gw, "delete", qid)
        assert res.returncode == 0, res.stderr
        assert f"{qid}: deleted" in res.stdout.decode()
        assert listed(gw) == [] and spool_files(gw, "hold") == []
        assert qid not in spool_files(gw, "data")
        again = mailgate(gw, "delete", qid)
        assert again.returncode == 1 and b"not in the quarantine" in again.stderr
        time.sleep(0.5)
        assert len(sink.messages) == 1  # only the accepted one
        assert mailgate(gw, "show", qid).returncode == 1


def test_automatic_expiry(gateway_factory):
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, "queue", retention_s=1))
        code, text = send(gw)
        qid = text.rsplit(" ", 1)[1]
        assert code == 250
        ev = gw.wait_for(lambda e: e.get("event") == "quarantine-expire"
                         and e.get("qid") == qid, timeout_s=5)
        assert ev["by"] == "gateway" and ev["age_s"] >= 1
        assert listed(gw) == [] and spool_files(gw, "hold") == []
        assert qid not in spool_files(gw, "data")
        assert sink.messages == []


def test_expire_command(gateway_factory):
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, "proxy", retention_s=1, expire_interval_s=3600))
        qid = send(gw)[1].rsplit(" ", 1)[1]
        res = mailgate(gw, "expire")
        assert res.returncode == 0 and "expired 0 messages" in res.stdout.decode()
        time.sleep(1.1)
        res = mailgate(gw, "expire")
        assert res.returncode == 0 and "expired 1 message " in res.stdout.decode(), res.stdout
        assert qid.encode() in res.stderr and b"quarantine-expire" in res.stderr
        assert listed(gw) == [] and spool_files(gw, "hold") == []


@pytest.mark.parametrize("mode", MODES)
def test_a_quarantine_that_cannot_be_written_answers_451(gateway_factory, mode):
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, mode), start=False)
        (gw.workdir / "spool" / "quarantine.db").mkdir(parents=True)  # not a database
        gw.start()
        code, text = send(gw)
        qid = text.rsplit(" ", 1)[-1].strip("()")
        assert (code, text) == (451, f"4.3.0 Temporary local problem, try again later ({qid})")
        ev = gw.message_event(qid)
        assert ev["action"] == "quarantine" and ev["relay"].startswith("quarantine failed:")
        assert spool_files(gw, "hold") == [] and spool_files(gw, "data") == []
        time.sleep(0.3)
        assert sink.messages == []


def test_cli_usage_errors(tmp_path: Path):
    gw = GatewayProcess(tmp_path / "gw", base_policy(spool={"directory": "spool"}))
    res = mailgate(gw, "list")  # no spool yet: an environment error, 1 (usage errors: 2)
    assert res.returncode == 1 and b"does not exist" in res.stderr
    (gw.workdir / "spool").mkdir()
    assert mailgate(gw, "show", "nope").returncode == 2
    res = mailgate(gw, "list", "--since", "yesterday")
    assert res.returncode == 2 and b"not a duration" in res.stderr
    res = mailgate(gw, "list")
    assert res.returncode == 0 and res.stdout == b"Quarantine is empty\n"


def test_an_index_that_is_not_a_database_is_set_aside_and_rebuilt(gateway_factory):
    # The index is rebuildable from hold/. Before: with quarantine.db overwritten (not an
    # SQLite file) every message to quarantine got 451 and `mailgate quarantine list` failed
    # with "file is not a database", until someone deleted the file by hand.
    with dsn_sink() as sink:
        gw = gateway_factory(policy(sink, "queue"), start=False)
        (gw.workdir / "spool").mkdir()
        (gw.workdir / "spool" / "quarantine.db").write_bytes(b"not a database\n" * 100)
        gw.start()
        code, text = send(gw)
        assert code == 250, text
        qid = text.rsplit(" ", 1)[1]
        assert gw.message_event(qid)["relay"] == "quarantined"
        [ev] = [e for e in gw.events() if e.get("event") == "quarantine-index-corrupt"]
        assert ev["reason"] == "file is not a database"
        assert ev["moved_to"] == str(gw.workdir / "spool" / "quarantine.db.corrupt")
        assert (gw.workdir / "spool" / "quarantine.db.corrupt").read_bytes().startswith(
            b"not a database\n")
        assert [row["qid"] for row in listed(gw)] == [qid]
