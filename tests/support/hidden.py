"""Test fixtures for files hidden in text (filters/_hidden.py), built here rather than shipped:
uuencode (``binascii.b2a_uu``, 45 bytes a line, as uuencode(1) writes), ``begin-base64``,
yEnc by hand per the yEnc 1.3 specification (yenc.org/yenc-draft.1.3.txt: each byte plus 42,
NUL/LF/CR/= escaped as ``=`` and the byte plus 64), and a plain-text mail carrying a block.
BinHex and TNEF come from the ClamAV test files in ../shared/corpora (clam.exe.binhex,
clam.tnef: the harmless clam.exe test program, 544 bytes)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
TESTFILES = CORPORA / "clamav-testfiles"
PE = b"MZ" + b"\x90" * 58 + (0x80).to_bytes(4, "little") + b"\x00" * 64 + b"PE\x00\x00" \
    + b"\x00" * 200


def uuencode(name: str, data: bytes, mode: str = "644") -> bytes:
    lines = [f"begin {mode} {name}".encode()]
    lines += [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return b"\r\n".join([*lines, b"`", b"end"])


def uuencode_base64(name: str, data: bytes) -> bytes:
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return f"begin-base64 644 {name}\r\n".encode() + body + b"===="


def yencode(name: str, data: bytes, line: int = 128) -> bytes:
    out, cur = [], bytearray()
    for b in data:
        c = (b + 42) % 256
        if c in (0x00, 0x0A, 0x0D, 0x3D):
            cur += bytes((0x3D, (c + 64) % 256))
        else:
            cur.append(c)
        if len(cur) >= line:
            out.append(bytes(cur))
            cur = bytearray()
    if cur:
        out.append(bytes(cur))
    head = f"=ybegin line={line} size={len(data)} name={name}".encode()
    tail = f"=yend size={len(data)} crc32={binascii.crc32(data):08x}".encode()
    return b"\r\n".join([head, *out, tail])


def text_mail(block: bytes, subject: str = "see below", sender: str = "bob@sender.test",
              rcpt: str = "alice@example.test") -> bytes:
    """A single text/plain message whose body holds ``block`` between two lines of prose."""
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(block))}.{subject.replace(' ', '.')}@sender.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "Hello, the file is below.\r\n\r\n").encode() + block + b"\r\n\r\nRegards\r\n"
