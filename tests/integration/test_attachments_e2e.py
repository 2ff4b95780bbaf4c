"""The attachments filter end to end: the real gateway (proxy relay to the sink) refuses banned
attachments and zip bombs at the end of DATA with ``554 5.7.1`` naming the file, relays clean
mail, and logs the symbols."""

from __future__ import annotations

import io
import re
import smtplib
import time
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess, base_policy
from tests.support.hidden import TESTFILES, text_mail, uuencode, yencode
from tests.support.rar5 import rar5
from tests.support.sink import Sink

RCPT = "alice@example.test"
QID_RE = re.compile(r"(?:\(|queued as )([0-9A-Z]{16})\)?$")
PE = b"MZ" + b"\x90" * 58 + (0x80).to_bytes(4, "little") + b"\x00" * 64 + b"PE\x00\x00" \
    + b"\x00" * 200


def message(*attachments: tuple[str, bytes, str]) -> bytes:
    m = EmailMessage()
    m["From"] = "bob@sender.test"
    m["To"] = RCPT
    m["Subject"] = "files"
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0000"
    m["Message-ID"] = "<1@sender.test>"
    m.set_content("see attached\n")
    for name, data, ctype in attachments:
        maintype, subtype = ctype.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


class World:
    def __init__(self, sink: Sink, gw: GatewayProcess) -> None:
        self.sink, self.gw = sink, gw

    def send(self, data: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP(*self.gw.address, timeout=30) as s:
            s.ehlo("client.sender.test")
            assert s.mail("bob@sender.test")[0] == 250
            assert s.rcpt(RCPT)[0] == 250
            return s.data(data)

    def nothing_relayed(self, before: int) -> None:
        with pytest.raises(AssertionError):  # the sink's wait_for times out
            self.sink.wait_for(before + 1, timeout_s=0.5)
        assert len(self.sink.messages) == before


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Sink() as sink:
        policy = base_policy(
            downstream=f"smtp://127.0.0.1:{sink.port}",
            filters=[{"name": "rcpt", "recipients": ["@example.test"]},
                     {"name": "attachments", "timeout_s": 20}])
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield World(sink, gw)


def qid_of(reply: bytes) -> str:
    m = QID_RE.search(reply.decode().strip())
    assert m, reply
    return m.group(1)


def attach_symbols(ev: dict[str, Any]) -> list[str]:
    return [s for s in ev["symbols"] if s.startswith("ATTACH_")]


def test_clean_attachments_are_relayed(world: World) -> None:
    before = len(world.sink.messages)
    pdf = b"%PDF-1.4\n%%EOF\n"
    code, reply = world.send(message(("report.pdf", pdf, "application/pdf"),
                                     ("src.zip", zip_bytes([("a/readme.txt", b"hi")]),
                                      "application/zip")))
    assert code == 250, reply
    assert b"report.pdf" in world.sink.wait_for(before + 1, timeout_s=10)[before].data
    ev = world.gw.message_event(qid_of(reply))
    assert ev["action"] == "accept" and attach_symbols(ev) == [], ev["symbols"]


def test_exe_attachment_is_refused_naming_the_file(world: World) -> None:
    before = len(world.sink.messages)
    code, reply = world.send(message(("invoice.pdf.exe", PE, "application/octet-stream")))
    text = reply.decode()
    assert code == 554 and text.startswith("5.7.1 "), (code, reply)
    assert '"invoice.pdf.exe"' in text and "ATTACH_BANNED_EXT" in text
    world.nothing_relayed(before)
    ev = world.gw.message_event(qid_of(reply))
    assert ev["action"] == "reject" and ev["by"] == "filter:attachments"
    assert set(attach_symbols(ev)) == {"ATTACH_BANNED_EXT(10)[invoice.pdf.exe]",
                                       "ATTACH_DOUBLE_EXT(10)[invoice.pdf.exe]",
                                       "ATTACH_EXECUTABLE(10)[invoice.pdf.exe]"}


def test_exe_in_zip_is_refused_with_its_path(world: World) -> None:
    before = len(world.sink.messages)
    z = zip_bytes([("docs/readme.txt", b"hi"), ("docs/setup.scr", b"x")])
    code, reply = world.send(message(("docs.zip", z, "application/zip")))
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"docs.zip/docs/setup.scr"' in reply
    world.nothing_relayed(before)


def test_zip_bomb_is_refused_quickly(world: World) -> None:
    bomb = zip_bytes([("zeros.txt", bytes(50 * 1024 * 1024))])
    assert len(bomb) < 100_000
    before = len(world.sink.messages)
    t0 = time.monotonic()
    code, reply = world.send(message(("report.zip", bomb, "application/zip")))
    elapsed = time.monotonic() - t0
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"report.zip/zeros.txt"' in reply and b"ATTACH_ZIPBOMB" in reply
    assert elapsed < 5, elapsed
    world.nothing_relayed(before)
    ev = world.gw.message_event(qid_of(reply))
    assert attach_symbols(ev) == ["ATTACH_ZIPBOMB(15)[report.zip/zeros.txt]"]


def test_uuencoded_exe_in_a_plain_text_body_is_refused(world: World) -> None:
    """Not a MIME attachment at all: a uuencoded program inside the text (relayed before)."""
    before = len(world.sink.messages)
    code, reply = world.send(text_mail(uuencode("setup.exe", PE), sender="bob@sender.test",
                                       rcpt=RCPT))
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"part1/setup.exe" (ATTACH_BANNED_EXT)' in reply
    world.nothing_relayed(before)
    ev = world.gw.message_event(qid_of(reply))
    assert set(attach_symbols(ev)) == {"ATTACH_BANNED_EXT(10)[part1/setup.exe]",
                                       "ATTACH_EXECUTABLE(10)[part1/setup.exe]"}


def test_yenc_program_in_a_plain_text_body_is_refused(world: World) -> None:
    before = len(world.sink.messages)
    code, reply = world.send(text_mail(yencode("holiday.jpg", PE), rcpt=RCPT))
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"part1/holiday.jpg" (ATTACH_EXECUTABLE)' in reply
    world.nothing_relayed(before)


def test_program_in_a_rar_is_refused_with_its_path(world: World) -> None:
    """The old filter only flagged a rar (ATTACH_ARCHIVE_UNSUPPORTED, score 1): relayed."""
    before = len(world.sink.messages)
    rar = rar5([("docs/readme.txt", b"hi"), ("docs/setup.exe", PE)])
    code, reply = world.send(message(("docs.rar", rar, "application/vnd.rar")))
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"docs.rar/docs/setup.exe" (ATTACH_BANNED_EXT)' in reply
    world.nothing_relayed(before)


def test_program_inside_a_tnef_winmail_dat_is_refused(world: World) -> None:
    """clam.tnef (ClamAV's test files): an Outlook winmail.dat holding clam.exe."""
    before = len(world.sink.messages)
    tnef = (TESTFILES / "clam.tnef").read_bytes()
    code, reply = world.send(message(("winmail.dat", tnef, "application/ms-tnef")))
    assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
    assert b'"winmail.dat/clam.exe" (ATTACH_BANNED_EXT)' in reply
    world.nothing_relayed(before)


def test_white_space_before_a_header_colon_hides_no_attachment(world: World) -> None:
    """RFC 5322 obs-optional (``Content-Type : ...``), read by mail clients: the stdlib parser
    took the line for the body, and the program behind it was relayed (old code: 250)."""
    before = len(world.sink.messages)
    plain = message(("setup.exe", PE, "application/octet-stream"))
    for data in (plain.replace(b"\r\nContent-Type: multipart/mixed", b"\r\nContent-Type :"
                                                                     b" multipart/mixed"),
                 plain.replace(b"Content-Disposition: attachment",
                               b"Content-Disposition\t: attachment")):
        assert data != plain
        code, reply = world.send(data)
        assert (code, reply.split(b" ", 1)[0]) == (554, b"5.7.1"), reply
        assert b'"setup.exe"' in reply and b"ATTACH_BANNED_EXT" in reply, reply
    world.nothing_relayed(before)


def test_a_tnef_declaring_4_billion_properties_is_answered_at_once(world: World) -> None:
    """21 bytes of winmail.dat whose property count tnefparse loops through (old code: a
    worker thread spinning for hours, a warning logged per property, the filter timing out
    into 451 4.7.1 for the sender to retry): now a bad archive, answered for good at once."""
    import struct
    stream = b"\x78\x9f\x3e\x22\x01\x00\x01" + struct.pack("<HHI", 0x9003, 6, 4) \
        + struct.pack("<I", 0xFFFFFFFF) + b"\0\0"
    before = len(world.sink.messages)
    t0 = time.monotonic()
    code, reply = world.send(message(("winmail.dat", stream, "application/ms-tnef")))
    assert code == 250 and time.monotonic() - t0 < 15, (code, reply)
    world.sink.wait_for(before + 1, timeout_s=10)
    ev = world.gw.message_event(qid_of(reply))
    assert "ATTACH_ARCHIVE_BAD(3)[winmail.dat/tnef (tnef)]" in ev["symbols"], ev["symbols"]
    assert not [e for e in world.gw.events() if e.get("logger", "").startswith("tnefparse")]
