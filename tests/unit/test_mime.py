"""gateway.mime: one parse per message, decoded headers, text (HTML reduced), URLs, parts."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
from pathlib import Path

import pytest

from gateway import mime
from gateway.message import Message

MULTI = (
    "From: =?utf-8?q?J=C3=B6rg?= <j@example.test>\r\n"
    "Subject: =?utf-8?b?SGVsbG8gV8O2cmxk?=\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    "--b1\r\n"
    'Content-Type: multipart/alternative; boundary="b2"\r\n\r\n'
    "--b2\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    "Gr=C3=BC=C3=9Fe, see http://plain.example.test/a?b=1.\r\n"
    "--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    "<html><head><style>p{}</style><script>var x='hidden';</script></head><body>"
    "<p>Click <a href=\"https://link.example.test/x\">here</a></p>"
    "<img src=\"http://img.example.test/i.png\" alt=\"pic\"></body></html>\r\n"
    "--b2--\r\n"
    "--b1\r\n"
    "Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n"
    "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.exe\r\n"
    "Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.b64encode(b"MZ\x90\x00binary").decode() + "\r\n"
    "--b1--\r\n").encode()


def test_parse_bytes_decodes_everything() -> None:
    v = mime.parse_bytes(MULTI)
    assert v.subject == "Hello Wörld"
    assert v.header_values("from") == ["Jörg <j@example.test>"]
    assert [t.content_type for t in v.texts] == ["text/plain", "text/html"]
    assert "Grüße" in v.texts[0].text
    html = v.texts[1]
    assert "Click" in html.text and "here" in html.text and "pic" in html.text
    assert "hidden" not in html.text and "<p>" not in html.text and "<p>" in html.raw
    assert v.urls == ("http://plain.example.test/a?b=1", "https://link.example.test/x",
                      "http://img.example.test/i.png")
    [att] = v.attachments
    assert (att.filename, att.content_type, att.payload) == \
        ("résumé.exe", "application/octet-stream", b"MZ\x90\x00binary")
    assert v.body_text.startswith("Hello Wörld\n") and not v.truncated


def test_view_is_parsed_once_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(MULTI)
    msg = Message.from_spool(path, len(MULTI))

    async def main() -> list[mime.MimeView]:
        return list(await asyncio.gather(*(mime.view(msg) for _ in range(5))))

    views = asyncio.run(main())
    assert all(v is views[0] for v in views)


def test_bounds_and_hosts() -> None:
    big = b"Subject: x\r\n\r\n" + b"a" * (mime.MAX_PARSE_BYTES + 10)
    assert mime.parse_bytes(big).truncated
    assert mime.parse_bytes(b"From sender@x Thu Aug 22 2002\nSubject: mbox\n\nhi\n").subject \
        == "mbox"
    assert mime.url_host("https://user:pw@Www.Example.TEST.:8080/p") == "www.example.test"
    assert mime.url_host("www.example.test/path") == "www.example.test"
    assert mime.url_host("http://[2001:db8::1]/") == "2001:db8::1"


def _b64_part(payload: bytes, encoded: str) -> bytes:
    return ("--b\r\nContent-Type: application/octet-stream; name=\"x.bin\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" + encoded + "\r\n").encode()


def test_the_streamed_parse_of_a_spool_file_equals_the_parse_of_its_bytes(
        tmp_path: Path, monkeypatch) -> None:
    """parse_message feeds the spool file to the parser in blocks (never the whole text in
    memory) and decodes clean base64 itself: the view must be exactly parse_bytes's — for a
    message cut by MAX_PARSE_BYTES, an mbox From_ line, base64 missing its padding, base64
    with junk (the stdlib's path) and a block boundary inside a header."""
    monkeypatch.setattr(mime, "FEED_BLOCK", 7)
    blob = bytes(range(256)) * 40
    good = base64.encodebytes(blob).decode().replace("\n", "\r\n")
    unpadded = base64.b64encode(b"abcd").decode().rstrip("=")  # 'YWJjZA' (needs ==)
    junk = "YWJj!!ZA=="
    head = (b"MIME-Version: 1.0\r\nSubject: streamed\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n")
    body = (_b64_part(blob, good) + _b64_part(b"", unpadded) + _b64_part(b"", junk)
            + b"--b\r\nContent-Type: text/plain\r\n\r\nhello http://x.example.test/\r\n--b--\r\n")
    for data in (head + body, b"From someone@example.test Mon Jan 1 00:00:00 2024\r\n"
                 + head + body):
        path = tmp_path / "m"
        path.write_bytes(data)
        want = mime.parse_bytes(data)
        got = mime.parse_message(Message.from_spool(path, len(data)))
        assert got == want
        assert [a.payload for a in got.attachments][:2] == [blob, b"abcd"]
    monkeypatch.setattr(mime, "MAX_PARSE_BYTES", len(head) + 300)  # cut inside the base64
    path.write_bytes(head + body)
    cut = mime.parse_message(Message.from_spool(path, len(head + body)))
    assert cut.truncated and cut == mime.parse_bytes(head + body)


@pytest.mark.parametrize("headers,expected", [
    ("Content-Type: text/plain\r\n", None),
    ("Content-Type: application/pdf; NAME=\"a.pdf\"\r\n", "a.pdf"),
    ("Content-Type: application/pdf\r\nContent-Disposition: attachment; FileName=b.pdf\r\n",
     "b.pdf"),
    ("Content-Type: application/pdf; name=ct.pdf\r\n"
     "Content-Disposition: attachment; filename=cd.pdf\r\n", "cd.pdf"),
    ("Content-Type: application/pdf; name=ct.pdf\r\nContent-Disposition: inline\r\n", "ct.pdf"),
    ("Content-Type: application/pdf\r\n"
     "Content-Disposition: attachment; filename*=utf-8''%C3%A9t%C3%A9.pdf\r\n", "été.pdf"),
    ("Content-Type: application/pdf; name=\"=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\"\r\n",
     "résumé.pdf"),
    ("Content-Type: application/pdf; name=\"\"\r\n", None),
    ("Content-Type: text/plain; x-name-ish=1\r\nContent-Disposition: attachment\r\n", None),
    ("Content-Disposition: attachment; filename=only.bin\r\n", "only.bin"),
])
def test_file_names_as_the_stdlib_finds_them(headers: str, expected: str | None) -> None:
    part = email.message_from_string(headers + "\r\nx\r\n", policy=email.policy.compat32)
    assert mime._filename(part) == expected
    name = part.get_filename()  # the stdlib's lookup, decoded as mime does
    assert (mime.decode_header(name) if name else None) == expected


def test_an_encoded_word_whose_charset_is_not_ascii_is_kept_as_sent() -> None:
    # the stdlib's make_header raises CharsetError (not a HeaderParseError) for it: the whole
    # MIME view failed, so every content filter of the message errored
    raw = b"From: a@b.test\r\nSubject: =?\xc3\xa9?q?a?= x\r\n\r\nhi\r\n"
    view = mime.parse_bytes(raw)
    assert view.subject == "=?\ufffd\ufffd?q?a?= x"  # compat32 shows the bytes so
    assert mime.decode_header("=?\u00e9?q?a?=") == "=?\u00e9?q?a?="
