"""RAR members listed by the attachments filter (filters/_rar.py, rarfile): names checked as
archive members, stored members by content too; compressed ones still flag the archive
unsupported (no unrar here); unreadable headers are a bad archive."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from pathlib import Path

from filters import _rar
from filters.attachments import AttachmentsFilter
from gateway import mime
from gateway.services import Services
from tests.support.hidden import PE
from tests.support.rar5 import rar5

DATA = Path(__file__).parent / "data"


def check(name: str, data: bytes) -> dict[str, tuple[str, ...]]:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.test", "b@example.test", "rar"
    m.set_content("see attached\n")
    m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    raw = m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    res = AttachmentsFilter.from_config({}, Services()).check_view(mime.parse_bytes(raw))
    return {s.name: s.options for s in res.symbols}


def test_a_program_stored_in_a_rar_is_found_by_name_and_content() -> None:
    rar = rar5([("docs/readme.txt", b"hello"), ("docs/setup.exe", PE),
                ("docs/holiday.jpg", PE)])
    assert check("docs.rar", rar) == {  # the old filter: ATTACH_ARCHIVE_UNSUPPORTED only
        "ATTACH_BANNED_EXT": ("docs.rar/docs/setup.exe",),
        "ATTACH_EXECUTABLE": ("docs.rar/docs/setup.exe", "docs.rar/docs/holiday.jpg")}


def test_compressed_members_are_listed_and_the_archive_still_flagged() -> None:
    rar = rar5([("invoice.pdf.exe", b"\x00" * 64)], compressed=True)
    assert check("invoice.rar", rar) == {
        "ATTACH_BANNED_EXT": ("invoice.rar/invoice.pdf.exe",),
        "ATTACH_DOUBLE_EXT": ("invoice.rar/invoice.pdf.exe",),
        "ATTACH_ARCHIVE_UNSUPPORTED": ("invoice.rar (rar)",)}


def test_archives_made_by_rar_itself() -> None:
    # RAR 5, one compressed text member: listed, not unpackable here
    assert check("times.rar", (DATA / "rar5-times.rar").read_bytes()) == \
        {"ATTACH_ARCHIVE_UNSUPPORTED": ("times.rar (rar)",)}
    # RAR 3, a directory and a stored text member: fully checked, clean
    assert check("ro.rar", (DATA / "rar3-readonly-win.rar").read_bytes()) == {}
    names = [m.name for m in _rar.members((DATA / "rar3-readonly-win.rar").read_bytes())]
    assert sorted(names) == ["ro_dir/", "ro_dir/ro_file.txt"]


def test_a_rar_inside_a_zip_is_opened() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inner.rar", rar5([("run.scr", b"x")]))
    assert check("outer.zip", buf.getvalue()) == \
        {"ATTACH_BANNED_EXT": ("outer.zip/inner.rar/run.scr",)}


def test_damaged_rar_is_bad_and_never_runs_a_tool() -> None:
    rar = bytearray(rar5([("a.txt", b"hello")]))
    rar[12] ^= 0xFF  # the main header's CRC no longer matches
    assert check("broken.rar", bytes(rar)) == {"ATTACH_ARCHIVE_BAD": ("broken.rar",)}
    bad_member = rar5([("a.txt", b"hello")]).replace(b"hello", b"jello")  # data CRC fails
    assert check("crc.rar", bad_member) == {"ATTACH_ARCHIVE_BAD": ("crc.rar/a.txt",)}
    import rarfile

    assert rarfile.UNRAR_TOOL == rarfile.SEVENZIP_TOOL == _rar.NO_TOOL
