"""filters._hidden and the attachments filter's walk into hidden files: uuencoded, yEnc and
BinHex 4.0 blocks inside text parts, and TNEF (winmail.dat) contents, are checked like
attached files (banned names, programs by content, archives)."""

from __future__ import annotations

import io
import logging
import struct
import threading
import time
import zipfile
from email.message import EmailMessage
from typing import Any

import pytest

from filters._hidden import HiddenFile, hidden_files
from filters.attachments import AttachmentsFilter
from gateway import mime
from gateway.services import Services
from tests.support.hidden import (
    PE,
    TESTFILES,
    text_mail,
    uuencode,
    uuencode_base64,
    yencode,
)

CLAM_EXE = (TESTFILES / "clam.exe").read_bytes()
BINARY = bytes(range(256)) * 4 + b"\x00\r\n=.\t "


def decoded(block: bytes) -> list[HiddenFile]:
    return list(hidden_files("text/plain", b"prose\r\n" + block + b"\r\nmore prose\r\n",
                             1 << 20))


@pytest.mark.parametrize("encode, encoding", [(uuencode, "uuencode"),
                                              (uuencode_base64, "uuencode"),
                                              (yencode, "yenc")])
def test_text_encodings_round_trip_every_byte(encode, encoding) -> None:  # type: ignore[no-untyped-def]
    [f] = decoded(encode("data.bin", BINARY))
    assert (f.encoding, f.name, f.data, f.whole, f.bad) == (encoding, "data.bin", BINARY,
                                                           True, False)


def test_binhex_and_tnef_from_the_clamav_testfiles() -> None:
    [bh] = decoded((TESTFILES / "clam.exe.binhex").read_bytes())
    assert (bh.encoding, bh.name, bh.data) == ("binhex", "clam.exe", CLAM_EXE)
    tnef = (TESTFILES / "clam.tnef").read_bytes()
    [t] = hidden_files("application/ms-tnef", tnef, 1 << 20)
    assert (t.encoding, t.name, t.data) == ("tnef", "clam.exe", CLAM_EXE)


def test_bounds_and_broken_blocks() -> None:
    [cut] = decoded(uuencode("big.bin", BINARY))
    assert list(hidden_files("text/plain", uuencode("big.bin", BINARY), 100))[0].whole is False
    assert cut.whole
    assert decoded(b"begin 644 x.exe\r\nM!!!!\x01\x02\r\nend")[0].bad
    assert decoded(b"(This file must be converted with BinHex 4.0)\r\n:~~~~:")[0].bad
    # a TNEF stream it cannot read yields nothing (a TNEF without attachments is common)
    assert [f for f in hidden_files("application/ms-tnef", b"\x78\x9f\x3e\x22garbage", 1 << 20)
            if not f.bad] == []
    assert decoded(b"we begin at 9 and end at 5") == []  # prose is not a block
    assert list(hidden_files("image/png", uuencode("a.exe", PE), 1 << 20)) == []


def test_decoding_a_large_block_is_fast() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB
    for encode in (yencode, uuencode):
        block = encode("big.bin", big)
        t0 = time.process_time()
        [f] = hidden_files("text/plain", block, 4 << 20)
        assert f.data == big
        assert time.process_time() - t0 < 2.0, encode


def check(data: bytes) -> dict[str, tuple[str, ...]]:
    res = AttachmentsFilter.from_config({}, Services()).check_view(mime.parse_bytes(data))
    return {s.name: s.options for s in res.symbols}


def test_uuencoded_exe_in_a_plain_text_body_is_banned() -> None:
    found = check(text_mail(uuencode("setup.exe", PE)))
    assert found == {"ATTACH_BANNED_EXT": ("part1/setup.exe",),
                     "ATTACH_EXECUTABLE": ("part1/setup.exe",)}


def test_yenc_program_under_an_innocent_name_is_found_by_content() -> None:
    assert check(text_mail(yencode("holiday.jpg", PE))) == \
        {"ATTACH_EXECUTABLE": ("part1/holiday.jpg",)}


def test_binhex_in_text_and_tnef_winmail_dat_are_walked() -> None:
    bh = (TESTFILES / "clam.exe.binhex").read_bytes().replace(b"\n", b"\r\n")
    assert check(text_mail(bh)) == {"ATTACH_BANNED_EXT": ("part1/clam.exe",),
                                    "ATTACH_EXECUTABLE": ("part1/clam.exe",)}
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.test", "b@example.test", "tnef"
    m.set_content("see attached\n")
    m.add_attachment((TESTFILES / "clam.tnef").read_bytes(), maintype="application",
                     subtype="ms-tnef", filename="winmail.dat")
    data = m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert check(data) == {"ATTACH_BANNED_EXT": ("winmail.dat/clam.exe",),
                           "ATTACH_EXECUTABLE": ("winmail.dat/clam.exe",)}


def test_an_archive_hidden_in_text_is_opened() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("docs/readme.txt", b"hi")
        zf.writestr("docs/run.scr", b"x")
    assert check(text_mail(uuencode_base64("docs.zip", buf.getvalue()))) == \
        {"ATTACH_BANNED_EXT": ("part1/docs.zip/docs/run.scr",)}


def test_clean_encoded_text_stays_clean() -> None:
    assert check(text_mail(uuencode("notes.txt", b"quarterly numbers\n" * 50))) == {}


def _tnef_object(level: int, name: int, body: bytes) -> bytes:
    return bytes((level,)) + struct.pack("<HHI", name, 6, len(body)) + body + b"\0\0"


def _in_thread(data: bytes) -> list[Any]:
    """hidden_files in a daemon thread given 20 s (the old code spun for hours: the test then
    fails instead of hanging)."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(
        list(hidden_files("application/ms-tnef", data, 1 << 20))), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "hidden_files still running after 20 s"
    return out[0]


TNEF_HEAD = b"\x78\x9f\x3e\x22\x01\x00"


@pytest.mark.parametrize("stream", [
    # message properties: 4 billion of them declared in 4 bytes (tnefparse loops through them
    # all past the end, logging a warning each: a 21-byte winmail.dat)
    TNEF_HEAD + _tnef_object(1, 0x9003, struct.pack("<I", 0xFFFFFFFF)),
    # attachment properties: one multi-valued short holding 4 billion values (as many objects)
    TNEF_HEAD + _tnef_object(2, 0x9002, b"\0\0\0\0")
    + _tnef_object(2, 0x9005, struct.pack("<IHHI", 1, 0x1002, 0x3001, 0xFFFFFFFF)),
    # recipient rows
    TNEF_HEAD + _tnef_object(1, 0x9004, struct.pack("<II", 0xFFFFFFFF, 0)),
], ids=["properties", "multi-values", "recipient-rows"])
def test_tnef_counts_beyond_the_stream_are_refused_not_looped(
        stream: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    found = _in_thread(stream)
    assert [(f.encoding, f.bad) for f in found] == [("tnef", True)]
    assert not [r for r in caplog.records if r.name.startswith("tnefparse")]


def test_the_tnef_bounds_pass_the_real_winmail_dat() -> None:
    from filters import _tnefbounds
    assert _tnefbounds.problem((TESTFILES / "clam.tnef").read_bytes()) is None


def test_a_recipient_table_whose_rows_reread_a_huge_count_is_stopped() -> None:
    """Row 1's string does not decode (a lone surrogate): tnefparse drops that property
    list and reads row 2's property count where the string's value count was, 0xFFFFFFF0,
    then loops through it (found by mutating clam.tnef; a first fix that walked the stream
    with the library's arithmetic missed it: the library's recovery decides where it reads)."""
    rows = struct.pack("<IIHHII", 2, 1, 0x001F, 0x3001, 0xFFFFFFF0, 4) + b"\x00\xd8\x00\x00" \
        + b"\0" * 16
    found = _in_thread(TNEF_HEAD + _tnef_object(1, 0x9004, rows))
    assert [(f.encoding, f.bad) for f in found] == [("tnef", True)]


def test_without_the_loop_budget_tnef_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from filters import _tnefbounds
    assert _tnefbounds.active()
    monkeypatch.setattr(_tnefbounds, "active", lambda: False)
    [t] = hidden_files("application/ms-tnef", (TESTFILES / "clam.tnef").read_bytes(), 1 << 20)
    assert (t.encoding, t.bad) == ("tnef", True)


@pytest.mark.parametrize("mode", ["7", "55", "100644", "000755"])
def test_uuencode_with_any_octal_mode_uudecode_accepts(mode: str) -> None:
    """uudecode(1) and Python's old uu module read the mode with %o / int(x, 8): any octal
    digits (old code: only 3 or 4, so 'begin 7 x.dat' hid a program and EICAR from clamd)."""
    text = b"hello\r\n" + uuencode("x.dat", PE, mode=mode) + b"\r\nbye\r\n"
    [f] = hidden_files("text/plain", text, 1 << 20)
    assert (f.name, f.data, f.bad) == ("x.dat", PE, False)
    b64 = b"hello\r\n" + uuencode_base64("y.dat", PE).replace(b" 644 ", f" {mode} ".encode())
    [f] = hidden_files("text/plain", b64, 1 << 20)
    assert (f.name, f.data, f.bad) == ("y.dat", PE, False)


@pytest.mark.parametrize("prose", [
    b"begin 2 weeks from now we move\r\nSee you all there, and bring friends\r\n",
    b"begin 7 days of rest\r\n\r\nend\r\n",
    b"begin 12 songs\r\nABCD\r\n",
])
def test_prose_starting_with_begin_and_a_number_is_not_a_block(prose: bytes) -> None:
    assert list(hidden_files("text/plain", prose, 1 << 20)) == []


def _embedded(inner: bytes) -> bytes:
    """A TNEF stream whose one attachment is an attached Outlook message (MAPI
    PR_ATTACH_DATA_OBJ holding IMessage's GUID and then a TNEF stream of its own)."""
    from tnefparse.mapi import IMESSAGE_SIG
    value = IMESSAGE_SIG + inner
    mapi = struct.pack("<IHHII", 1, 0x000D, 0x3701, 1, len(value)) + value \
        + b"\0" * (-len(value) % 4)
    return TNEF_HEAD + _tnef_object(2, 0x9002, b"\1\0\0\0" * 3 + b"\0" * 4) \
        + _tnef_object(2, 0x9005, mapi)


def test_a_program_in_an_outlook_message_attached_inside_tnef_is_found() -> None:
    """winmail.dat -> attached message -> clam.exe: the old walk yielded the inner message
    as one unnamed blob, so the program's name and content were never checked."""
    stream = _embedded(_embedded((TESTFILES / "clam.tnef").read_bytes()))
    [f] = hidden_files("application/ms-tnef", stream, 1 << 20)
    assert (f.name, f.data, f.bad) == ("message/message/clam.exe", CLAM_EXE, False)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.test", "b@example.test", "tnef"
    m.set_content("see attached\n")
    m.add_attachment(stream, maintype="application", subtype="ms-tnef", filename="winmail.dat")
    res = AttachmentsFilter.from_config({}, Services()).check_view(mime.parse_bytes(m.as_bytes()))
    found = {s.name: s.options for s in res.symbols}
    assert found["ATTACH_BANNED_EXT"] == ("winmail.dat/message/message/clam.exe",), found
