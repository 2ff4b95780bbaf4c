"""The private Postfix test instance (tests/support/postfix.py) works as a real downstream MTA."""

from __future__ import annotations

import email
import email.message
import shutil
import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance, postfix_available, postfix_unavailable_reason

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(
        not postfix_available(),
        reason=f"private Postfix instance unavailable: {postfix_unavailable_reason()}",
    ),
]

SWAKS = shutil.which("swaks")


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    workdir = tmp_path_factory.mktemp("postfix-downstream")
    with PostfixInstance(workdir, domains=("example.test", "example.org")) as pf:
        yield pf


def _parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw)


def _by_recipient(raws: list[bytes]) -> dict[str, email.message.Message]:
    msgs = [_parse(r) for r in raws]
    return {str(m["Delivered-To"]): m for m in msgs}


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, pgid, state, command), from ps (or /proc if procps is missing)."""
    table: dict[int, tuple[int, int, str, str]] = {}
    if shutil.which("ps"):
        out = subprocess.run(
            ["ps", "-e", "-o", "pid=,ppid=,pgid=,stat=,comm="],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines():
            pid, ppid, pgid, stat, comm = line.split(None, 4)
            table[int(pid)] = (int(ppid), int(pgid), stat, comm)
        return table
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
            table[int(entry.name)] = (int(ppid), int(pgid), state, comm)
    return table


def _instance_processes(master_pid: int) -> dict[int, tuple[int, int, str, str]]:
    """The master and everything in its process group or parented by it (zombies included)."""
    return {
        pid: row
        for pid, row in _processes().items()
        if pid == master_pid or row[0] == master_pid or row[1] == master_pid
    }


def test_smtplib_message_lands_in_maildir_with_envelope(downstream: PostfixInstance) -> None:
    token = uuid.uuid4().hex
    msg = EmailMessage()
    msg["From"] = "Sender <sender@origin.test>"
    msg["To"] = "alice@example.test, bob@example.org"
    msg["Subject"] = f"smtplib test {token}"
    msg["Message-ID"] = f"<{token}@origin.test>"
    msg["X-Test-Token"] = token
    msg.set_content(f"Hello from smtplib.\n{token}\n")

    with smtplib.SMTP(downstream.host, downstream.port, timeout=10) as client:
        refused = client.send_message(
            msg,
            from_addr="bounces@origin.test",
            to_addrs=["alice@example.test", "bob@example.org"],
        )
    assert refused == {}

    raws = downstream.wait_for_messages(2, containing=token.encode())
    assert len(raws) == 2  # one Maildir file per recipient
    by_rcpt = _by_recipient(raws)
    assert set(by_rcpt) == {"alice@example.test", "bob@example.org"}
    for rcpt, delivered in by_rcpt.items():
        assert delivered["X-Original-To"] == rcpt
        assert delivered["Return-Path"] == "<bounces@origin.test>"  # envelope, not From:
        assert delivered["From"] == "Sender <sender@origin.test>"
        assert delivered["To"] == "alice@example.test, bob@example.org"
        assert delivered["Subject"] == f"smtplib test {token}"
        assert delivered["Message-ID"] == f"<{token}@origin.test>"
        assert delivered["X-Test-Token"] == token
        assert "by downstream.mailgate.test (Postfix)" in delivered["Received"]
        body = delivered.get_payload(decode=True)
        assert isinstance(body, bytes)
        assert f"Hello from smtplib.\n{token}\n" in body.decode()

    downstream.wait_for_log(r"to=<alice@example\.test>, relay=virtual, .*status=sent")
    downstream.wait_for_log(r"to=<bob@example\.org>, relay=virtual, .*status=sent")


@pytest.mark.swaks
@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
def test_swaks_message_lands_in_maildir_with_envelope(downstream: PostfixInstance) -> None:
    assert SWAKS is not None
    token = uuid.uuid4().hex
    res = subprocess.run(
        [
            SWAKS,
            "--server", f"{downstream.host}:{downstream.port}",
            "--from", "swaks-sender@origin.test",
            "--to", "carol@example.test",
            "--helo", "client.origin.test",
            "--header", f"Subject: swaks test {token}",
            "--header", f"X-Test-Token: {token}",
            "--body", f"Hello from swaks. {token}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr

    [raw] = downstream.wait_for_messages(1, containing=token.encode())
    delivered = _parse(raw)
    assert delivered["Delivered-To"] == "carol@example.test"
    assert delivered["X-Original-To"] == "carol@example.test"
    assert delivered["Return-Path"] == "<swaks-sender@origin.test>"
    assert delivered["Subject"] == f"swaks test {token}"
    assert delivered["X-Test-Token"] == token
    assert delivered["X-Mailer"].startswith("swaks")
    assert delivered["Received"].startswith("from client.origin.test (unknown [127.0.0.1])")
    assert f"Hello from swaks. {token}" in delivered.get_payload()


def test_other_domains_are_refused_not_relayed(downstream: PostfixInstance) -> None:
    token = uuid.uuid4().hex
    with smtplib.SMTP(downstream.host, downstream.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(
                "sender@origin.test",
                ["someone@elsewhere.test"],
                f"Subject: {token}\r\n\r\nnope\r\n".encode(),
            )
    code, reply = refused.value.recipients["someone@elsewhere.test"]
    assert code == 550
    assert b"Recipient address rejected" in reply
    assert not [m for m in downstream.messages() if token.encode() in m]


def test_stop_leaves_no_processes_and_restart_works(
    downstream: PostfixInstance, tmp_path: Path
) -> None:
    # A second instance next to the module one: own port, own domains, own options.
    banner = f"private-test-{uuid.uuid4().hex[:8]}"
    pf = PostfixInstance(
        tmp_path / "pf",
        domains=("second.test",),
        smtpd_options={"smtpd_banner": f"$myhostname ESMTP {banner}"},
    )
    ports = set()
    for round_no in (1, 2):  # start, stop, start again (same workdir, same port), stop
        pf.start()
        try:
            ports.add(pf.port)
            assert len(ports) == 1
            assert pf.port != downstream.port
            master = pf.master_pid
            assert master is not None
            with smtplib.SMTP(timeout=10) as client:
                code, greeting = client.connect(pf.host, pf.port)
                assert code == 220
                assert greeting.decode() == f"downstream.mailgate.test ESMTP {banner}"
                client.sendmail(
                    "s@origin.test", [f"r{round_no}@second.test"], b"Subject: x\r\n\r\nx\r\n"
                )
            assert len(pf.wait_for_messages(round_no)) == round_no  # mail survives restarts
            running = _instance_processes(master)
            assert master in running
            children = {pid for pid, row in running.items() if row[0] == master}
            assert children, running  # qmgr, postlogd, smtpd, ...
            assert any(row[3] == "qmgr" for row in running.values()), running
        finally:
            pf.stop()
        assert not pf.running
        leftovers = _instance_processes(master)
        assert not leftovers, f"processes left after stop(): {leftovers}"
        assert not (set(_processes()) & (children | {master}))
    assert any("daemon started" in line for line in pf.log_lines())
    # the module instance is unaffected
    with smtplib.SMTP(downstream.host, downstream.port, timeout=10) as client:
        assert client.noop()[0] == 250


def test_maillog_has_startup_and_no_warnings(downstream: PostfixInstance) -> None:
    with smtplib.SMTP(downstream.host, downstream.port, timeout=10) as client:
        assert client.noop()[0] == 250
    lines = downstream.log_lines()
    assert any(
        "postfix-mailgate-test/master" in line and "daemon started" in line for line in lines
    )
    assert not [line for line in lines if "warning:" in line or "fatal:" in line]
