"""What a file is and what it is called, for the ``attachments`` filter: the kind of content
from its first bytes (programs, archives, common documents), the extensions of a name, the
names a MIME part goes by, names made safe for logs and SMTP replies, and the small readers of
compressed streams (gzip header name, chunked decompression) the archive walk uses."""

from __future__ import annotations

import io
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from gateway import mime

if TYPE_CHECKING:
    import zipfile

COMPRESSED = {"gzip": ("gz", "tgz"), "bzip2": ("bz2", "tbz", "tbz2"), "xz": ("xz", "txz")}
CHUNK = 64 * 1024
MAX_OPTION_CHARS = 200


def show(name: str) -> str:
    """A name safe for logs and SMTP replies' neighbours: control, format (bidi, zero-width)
    and line-separator characters escaped as ``\\uXXXX``, length capped."""
    return _escaped(name, lambda ch: unicodedata.category(ch) not in _HIDDEN, MAX_OPTION_CHARS)


def ascii_name(name: str, limit: int = 80) -> str:
    """A name for an SMTP reply: printable ASCII only (anything else as ``\\uXXXX``)."""
    return _escaped(name, lambda ch: " " <= ch <= "~", limit)


_HIDDEN = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"))


def _escaped(name: str, keep: Callable[[str], bool], limit: int) -> str:
    """``name`` with ``\\`` doubled and each character not kept as ``\\uXXXX``, cut at
    ``limit`` characters (``...`` ending a cut one)."""
    s = "".join("\\\\" if ch == "\\" else ch if keep(ch) else f"\\u{ord(ch):04x}"
                for ch in name)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def sniff(head: bytes) -> str | None:
    """The kind of content from its first bytes (None: nothing we know)."""
    if head.startswith(b"MZ"):
        if len(head) >= 0x40:
            off = int.from_bytes(head[0x3C:0x40], "little")
            if off + 4 <= len(head) and head[off:off + 2] in (b"PE", b"NE", b"LE", b"LX"):
                return "pe"
        if b"This program cannot be run in DOS mode" in head[:1024] \
                or b"This program must be run under Win32" in head[:1024]:
            return "pe"
        return None
    kind = _prefixed(head, _MAGIC)
    if kind is not None:
        return kind
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return "bzip2"
    if head[257:262] == b"ustar":
        return "tar"
    if head[0x8001:0x8006] == b"CD001" or head[0x8801:0x8806] == b"CD001":
        return "iso"
    return _prefixed(head, _DOCUMENTS)


def _prefixed(head: bytes, table: tuple[tuple[bytes, str], ...]) -> str | None:
    return next((kind for prefix, kind in table if head.startswith(prefix)), None)


# (leading bytes, kind), checked in this order: executables and archives first (before the
# tar/ISO checks at fixed offsets), then common documents
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x7fELF", "elf"),
    *((m, "macho") for m in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                             b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe")),
    *((m, "zip") for m in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")),
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"Rar!\x1a\x07", "rar"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"MSCF\x00\x00\x00\x00", "cab"),
)
_DOCUMENTS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "pdf"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "cfb"),
)


def extensions(name: str) -> list[str]:
    """The dot-separated extensions of a file name's last path component, lower case, each
    stripped of surrounding spaces; trailing dots and spaces of the name are ignored."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(" .\t")
    pieces = base.split(".")[1:]
    return [p.strip(" \t").lower() for p in pieces]


def open_zip(data: bytes) -> zipfile.ZipFile:
    """``zipfile.ZipFile`` over ``data``. A central directory entry whose "version needed to
    extract" the stdlib refuses (above its 6.3: NotImplementedError for the whole archive) is
    read with that byte lowered to 2.0: unzip tools ignore the field, so the members are what
    a recipient gets. Raises zipfile's other errors."""
    import zipfile

    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except NotImplementedError:
        pass
    buf, at = bytearray(data), data.find(b"PK\x01\x02")
    while 0 <= at < len(buf) - 8:
        if buf[at + 6] > zipfile.MAX_EXTRACT_VERSION:
            buf[at + 6] = 20
        at = data.find(b"PK\x01\x02", at + 4)
    try:
        return zipfile.ZipFile(io.BytesIO(bytes(buf)))
    except NotImplementedError as e:
        raise zipfile.BadZipFile(str(e)) from None


def zip_infos(data: bytes) -> list[zipfile.ZipInfo] | None:
    import zipfile

    try:
        return open_zip(data).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
        return None


def is_office(data: bytes) -> bool:
    """An OOXML / ODF document (``[Content_Types].xml`` or ``mimetype`` as the first member).
    Named as one (.docx, .xlsx, .odt …), it is not opened as an archive: its XML parts compress
    far beyond any sane archive ratio, and a mail client opens it as a document, not as a zip
    whose members a user could run."""
    return data[30:49] == b"[Content_Types].xml" or data[30:38] == b"mimetype"


def part_names(part: mime.Part) -> list[str]:
    """The names a part goes by: its filename (Content-Disposition, else Content-Type name=)
    and every other name its headers give (``Part.names``: repeated parameters and headers,
    Content-Type's name= — mail clients disagree on which wins); a name holding a NUL also
    as a C string reads it (cut there)."""
    names = list(dict.fromkeys([*([part.filename] if part.filename else []), *part.names]))
    for n in list(names):
        cut = n.split("\x00", 1)[0]
        if cut != n and cut and cut not in names:
            names.append(cut)
    return names


def gzip_fname(data: bytes) -> str | None:
    """FNAME from a gzip member header (RFC 1952 §2.3), or None."""
    if len(data) < 10 or data[:3] != b"\x1f\x8b\x08":
        return None
    flg = data[3]
    pos = 10
    if flg & 0x04:  # FEXTRA
        if len(data) < pos + 2:
            return None
        pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
    if not flg & 0x08:  # FNAME
        return None
    end = data.find(b"\x00", pos, pos + 1024)
    if end < 0:
        return None
    return data[pos:end].decode("latin-1") or None


def strip_suffix(name: str, kind: str) -> str:
    base, dot, ext = name.rpartition(".")
    if dot and ext.lower() in COMPRESSED[kind]:
        return base + ".tar" if ext.lower().startswith("t") else base
    return name or "data"


def decompress(kind: str, data: bytes) -> Iterator[bytes]:
    """The decompressed stream in chunks of at most CHUNK bytes (never more at once)."""
    import bz2
    import lzma

    if kind == "gzip":
        z = zlib.decompressobj(31)
        buf = data
        while buf and not z.eof:
            out = z.decompress(buf, CHUNK)
            buf = z.unconsumed_tail
            if not out and not buf:
                break
            if out:
                yield out
        return
    d: bz2.BZ2Decompressor | lzma.LZMADecompressor = \
        bz2.BZ2Decompressor() if kind == "bzip2" else lzma.LZMADecompressor()
    out = d.decompress(data, CHUNK)
    while True:
        if out:
            yield out
        if d.eof or d.needs_input:
            return
        out = d.decompress(b"", CHUNK)
