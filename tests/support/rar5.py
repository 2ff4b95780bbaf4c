"""A RAR 5 archive built by hand for tests, since no program here writes RAR (``rar`` is
non-free, 7-Zip only reads it): the layout of rarlab.com's "RAR 5.0 archive format" technote,
members stored uncompressed (method 0) or declared compressed (method 3, the data left as
given: listable, not unpackable without unrar). 7-Zip's ``7z l``/``7z t`` and rarfile both
read what it builds."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"Rar!\x1a\x07\x01\x00"


def vint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def block(htype: int, hflags: int, body: bytes, data_size: int | None = None) -> bytes:
    fields = vint(htype) + vint(hflags) + (vint(data_size) if data_size is not None else b"") \
        + body
    head = vint(len(fields)) + fields
    return struct.pack("<I", zlib.crc32(head)) + head


def rar5(members: list[tuple[str, bytes]], *, compressed: bool = False) -> bytes:
    out = SIGNATURE + block(1, 0, vint(0))  # main archive header, no archive flags
    for name, data in members:
        method = 3 if compressed else 0
        comp_info = method << 7  # version 0, not solid, dictionary 128 KB
        raw = name.encode()
        body = (vint(0x0004)  # file flags: data CRC32 present
                + vint(len(data)) + vint(0x20)  # unpacked size, attributes (archive)
                + struct.pack("<I", zlib.crc32(data))
                + vint(comp_info) + vint(0)  # host OS: Windows
                + vint(len(raw)) + raw)
        out += block(2, 0x0002, body, data_size=len(data)) + data
    return out + block(5, 0, vint(0))  # end of archive
