"""RFC 5322 §4.5 obsolete header syntax in MIME headers (``obs-optional``: white space between a
field name and its colon, ``Content-Type : multipart/mixed``): the MIME view reads such a field
as every mail client that follows the RFC does, so a structure or a file name written that way
is seen. The stdlib's feed parser took the line for the start of the body (the message's, or
the part's), hiding every part and attachment behind it."""

from __future__ import annotations

import base64

from gateway import mime, obsheaders, patches

PE = b"MZ" + b"\x90" * 58 + (0x80).to_bytes(4, "little") + b"\x00" * 64 + b"PE\x00\x00" \
    + b"\x00" * 200


def mail(top: str, part: str) -> bytes:
    return (("From: bob@sender.test\r\nTo: alice@example.test\r\nSubject: f\r\n"
             f"MIME-Version: 1.0\r\n{top}\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\n"
             f"hi\r\n--BB\r\n{part}\r\n\r\n").encode() + base64.b64encode(PE)
            + b"\r\n--BB--\r\n")


TOP = 'Content-Type: multipart/mixed; boundary="BB"'
PART = ("Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
        "filename=setup.exe\r\nContent-Transfer-Encoding: base64")


def names(view: mime.MimeView) -> list[tuple[str | None, bytes]]:
    return [(p.filename, p.payload) for p in view.attachments]


def test_white_space_before_the_colon_of_the_top_content_type() -> None:
    for top in ('Content-Type : multipart/mixed; boundary="BB"',
                'Content-Type\t: multipart/mixed; boundary="BB"',
                'content-type   :multipart/mixed; boundary="BB"'):
        view = mime.parse_bytes(mail(top, PART))
        assert names(view) == [("setup.exe", PE)], top  # old: no part at all


def test_white_space_before_the_colon_in_a_part_header() -> None:
    for part in (PART.replace("Content-Disposition:", "Content-Disposition :"),
                 PART.replace("Content-Type:", "Content-Type \t :"),
                 PART.replace("Content-Transfer-Encoding:", "Content-Transfer-Encoding :")):
        view = mime.parse_bytes(mail(TOP, part))
        assert names(view) == [("setup.exe", PE)], part  # old: no name, or base64 text


def test_header_names_are_read_without_the_white_space() -> None:
    view = mime.parse_bytes(b"Subject : hello\r\nX-A\t: 1\r\n\r\nbody\r\n")
    assert [n for n, _ in view.raw_headers] == ["Subject", "X-A"]
    assert view.header_values("subject") == ["hello"]
    assert view.subject == "hello" and [t.text.strip() for t in view.texts] == ["body"]


def test_a_body_line_with_a_colon_stays_body() -> None:
    view = mime.parse_bytes(b"Subject: x\r\n\r\nNote : this is text\r\nA: b\r\n")
    assert view.header_values("note") == []
    assert "Note : this is text" in view.body_text


def test_the_patch_is_in_use() -> None:
    assert patches.active(obsheaders.PATCH)


def test_the_check_refuses_a_changed_stdlib(monkeypatch: object) -> None:
    import email.feedparser
    import re

    import pytest
    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    assert obsheaders.check() is None
    monkeypatch.setattr(email.feedparser, "headerRE", re.compile(r"^([\041-\176]*:)"))
    assert obsheaders.check() == "email.feedparser.headerRE has another pattern"
