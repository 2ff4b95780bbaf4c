"""The clamav filter end to end: the real gateway (proxy relay to the sink) scanning with a real
clamd (tests/support/clamd.py). A virus is refused at end of data with ``554 5.7.1`` naming the
signature and never reaches the downstream; clean mail is relayed; clamd unreachable or hung is
a ``451 4.7.1`` (the filter's default ``on_error = "tempfail"``), or relayed with
``on_error = "continue"`` — the log line carries ``CLAMAV_ERROR`` either way."""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import clamd as support
from tests.support.clamd import (
    CORPORA,
    EICAR,
    EICAR_NAME,
    SKIP_REASON,
    TESTFILE_NAME,
    ClamdServer,
    HangingServer,
    free_port,
    mail_with_attachments,
)
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.hidden import text_mail, uuencode, yencode
from tests.support.sink import Sink

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

CLAM_MAIL = CORPORA / "clamav-testfiles" / "clam.mail"
SENDER = "sender@example.org"
RCPT = "alice@example.test"
QID = re.compile(r"\(([0-9A-Z]{16})\)$")


def message(attachments: list[tuple[str, bytes]], subject: str) -> bytes:
    return mail_with_attachments(attachments, subject=subject,
                                 text="Please find the file attached.\n",
                                 message_id=f"<{subject.replace(' ', '.')}@example.org>")


class World:
    def __init__(self, sink: Sink, gateways: dict[str, GatewayProcess]) -> None:
        self.sink = sink
        self.gw = gateways

    def send(self, which: str, data: bytes) -> tuple[int, str, dict[str, Any]]:
        """Send one message through gateway ``which``: the end-of-DATA reply and the message
        log line of that transaction."""
        gw = self.gw[which]
        seen = {e.get("qid") for e in gw.events("message")}
        with smtplib.SMTP(*gw.address, timeout=30) as s:
            s.ehlo("client.example.org")
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(RCPT)[0] == 250
            code, text = s.data(data)
        ev = gw.wait_for(lambda e: e.get("event") == "message" and e.get("qid") not in seen)
        return code, text.decode(), ev

    def relayed(self, before: int) -> list[bytes]:
        return [m.data for m in self.sink.messages[before:]]


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdServer]:
    with support.shared() as server:
        yield server


@pytest.fixture(scope="module")
def world(clamd: ClamdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def policy(**clamav: Any) -> dict[str, Any]:
        return base_policy(filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                                    {"name": "clamav", **clamav}],
                           downstream=f"smtp://127.0.0.1:{sink.port}")

    with Sink() as sink, HangingServer() as hung:
        configs = {
            "tcp": policy(address=clamd.tcp_address),
            "unix": policy(address=clamd.unix_address),
            "down": policy(address=f"tcp:127.0.0.1:{free_port()}"),
            "down_continue": policy(address=f"unix:{clamd.workdir}/nosuch.sock",
                                    on_error="continue"),
            "hung": policy(address=hung.address, scan_timeout_s=1, timeout_s=5),
        }
        gateways: dict[str, GatewayProcess] = {}
        try:
            for name, p in configs.items():
                gateways[name] = GatewayProcess(tmp_path_factory.mktemp(f"gw-{name}"), p).start()
            yield World(sink, gateways)
        finally:
            for gw in gateways.values():
                gw.stop()


@pytest.mark.parametrize("which", ["tcp", "unix"])
def test_eicar_attachment_is_rejected_and_not_relayed(world: World, which: str) -> None:
    before = len(world.sink.messages)
    code, text, ev = world.send(which, message([("eicar.com", EICAR)], f"eicar {which}"))
    assert code == 554, text
    assert text.startswith(f"5.7.1 Message rejected: virus found: {EICAR_NAME} ("), text
    qid = QID.search(text)
    assert qid is not None and ev["qid"] == qid[1]
    assert (ev["action"], ev["relay"]) == ("reject", "not relayed")
    assert f"CLAMAV_VIRUS(0)[{EICAR_NAME}]" in ev["symbols"]
    time.sleep(0.3)  # proxy mode: a relay would already be underway
    assert world.relayed(before) == []


def test_clamav_testfile_mail_is_rejected(world: World) -> None:
    """clam.mail from clamav-testfiles: an RFC 822 message with the clam.exe sample attached."""
    data = re.sub(rb"\r?\n", b"\r\n", CLAM_MAIL.read_bytes())
    before = len(world.sink.messages)
    code, text, ev = world.send("tcp", data)
    assert code == 554 and text.startswith(f"5.7.1 Message rejected: virus found: {TESTFILE_NAME}")
    assert f"CLAMAV_VIRUS(0)[{TESTFILE_NAME}]" in ev["symbols"]
    assert world.relayed(before) == []


@pytest.mark.parametrize("which", ["tcp", "unix"])
def test_clean_message_is_relayed(world: World, which: str) -> None:
    before = len(world.sink.messages)
    data = message([("notes.txt", b"quarterly numbers\n")], f"clean {which}")
    code, text, ev = world.send(which, data)
    assert code == 250, text
    assert ev["action"] == "accept"
    assert "CLAMAV_CLEAN(0)" in ev["symbols"]
    relayed = world.relayed(before)
    assert len(relayed) == 1 and f"Subject: clean {which}".encode() in relayed[0]


def test_clamd_down_tempfails_and_relays_nothing(world: World) -> None:
    before = len(world.sink.messages)
    code, text, ev = world.send("down", message([("eicar.com", EICAR)], "down"))
    assert code == 451, text
    assert text.startswith("4.7.1 Virus scanner unavailable, try again later ("), text
    assert "CLAMAV_ERROR(0)[error]" in ev["symbols"]
    assert (ev["action"], ev["relay"]) == ("tempfail", "not relayed")
    assert "cannot connect to clamd" in str(ev.get("filter_errors")), ev
    time.sleep(0.3)
    assert world.relayed(before) == []


def test_clamd_hung_tempfails_within_scan_timeout(world: World) -> None:
    before = len(world.sink.messages)
    start = time.monotonic()
    code, text, ev = world.send("hung", message([("notes.txt", b"x\n")], "hung"))
    elapsed = time.monotonic() - start
    assert code == 451 and text.startswith("4.7.1 "), text
    assert "CLAMAV_ERROR(0)[error]" in ev["symbols"]
    assert "no complete scan reply within 1s" in str(ev.get("filter_errors")), ev
    assert 1.0 <= elapsed < 4.0, elapsed  # scan_timeout_s = 1, well before timeout_s = 5
    assert world.relayed(before) == []


def test_clamd_down_with_on_error_continue_relays_marked(world: World) -> None:
    before = len(world.sink.messages)
    code, text, ev = world.send("down_continue", message([("a.txt", b"a\n")], "continue"))
    assert code == 250, text
    assert "CLAMAV_ERROR(0)[error]" in ev["symbols"]
    assert not any(s.startswith("CLAMAV_CLEAN") for s in ev["symbols"])
    relayed = world.relayed(before)
    assert len(relayed) == 1 and b"Subject: continue" in relayed[0]


@pytest.mark.parametrize("encoding", ["yenc", "binhex", "uuencode"])
def test_virus_encoded_inside_a_text_body_is_rejected(world: World, encoding: str) -> None:
    """clamd decodes uuencode in mail but not yEnc or BinHex inside a text part (it answered
    ``stream: OK`` for both): the filter decodes them and scans each file too."""
    block, virus = {
        "yenc": (yencode("notes.txt", EICAR), EICAR_NAME),
        "binhex": ((CORPORA / "clamav-testfiles" / "clam.exe.binhex").read_bytes()
                   .replace(b"\n", b"\r\n"), TESTFILE_NAME),
        "uuencode": (uuencode("notes.txt", EICAR), EICAR_NAME),
    }[encoding]
    before = len(world.sink.messages)
    code, text, ev = world.send("tcp", text_mail(block, subject=f"hidden {encoding}",
                                                 sender=SENDER, rcpt=RCPT))
    assert code == 554, text
    assert text.startswith(f"5.7.1 Message rejected: virus found: {virus} ("), text
    # clamd's own scan of the mail finds the uuencoded one; ours names the hidden file
    name = {"yenc": "part1/notes.txt", "binhex": "part1/clam.exe"}.get(encoding)
    assert (f"CLAMAV_VIRUS(0)[{virus}|{name}]" if name else f"CLAMAV_VIRUS(0)[{virus}]") \
        in ev["symbols"], ev["symbols"]
    assert (ev["action"], ev["relay"]) == ("reject", "not relayed")
    time.sleep(0.3)
    assert world.relayed(before) == []


def test_eicar_uuencoded_with_a_one_digit_mode_is_rejected(world: World) -> None:
    """'begin 7 notes.txt': uudecode(1) reads any octal mode; clamd's own scan and the old
    walk (3 or 4 digits only) both missed it, and the message was relayed (250)."""
    before = len(world.sink.messages)
    code, text, ev = world.send("tcp", text_mail(uuencode("notes.txt", EICAR, mode="7"),
                                                 subject="mode 7", sender=SENDER, rcpt=RCPT))
    assert code == 554, text
    assert f"CLAMAV_VIRUS(0)[{EICAR_NAME}|part1/notes.txt]" in ev["symbols"], ev["symbols"]
    time.sleep(0.3)
    assert world.relayed(before) == []
