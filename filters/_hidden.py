"""Files hidden where a MIME walk does not see a file: uuencoded, yEnc and BinHex 4.0 blocks
inside a text part's content, and the attachments of a TNEF part (``winmail.dat``,
``application/ms-tnef``). :func:`hidden_files` yields each one's name and decoded bytes, so
the ``attachments`` filter checks it as it checks an attached file (name, type by content,
archives) and the ``clamav`` filter sends it to clamd.

Decoding, and why here:

* uuencode (and ``begin-base64``): ``binascii.a2b_uu`` / ``a2b_base64`` per line (the stdlib's
  ``uu`` module is gone in Python 3.13). Each line is cut to the length its first character
  declares, as ``uu`` did, since many encoders pad lines.
* yEnc (yenc.org, version 1.3): a byte is its character minus 42, ``=`` escapes a critical
  character (minus 64 more). Eight lines of code; PyPI's decoders (sabyenc3, last release
  2022, a C extension for SABnzbd) are usenet downloader internals, not a library to lean on.
* BinHex 4.0 (RFC 1741, Apple's "BinHex 4.0" format): a 64-character alphabet, run-length
  coding with 0x90, a header holding the name and the fork lengths. The stdlib's ``binhex``
  and ``binascii.a2b_hqx`` were removed in Python 3.11 and PyPI has no maintained
  replacement, so it is decoded here (the data fork only: the resource fork is Mac metadata).
* TNEF: the ``tnefparse`` library (pure Python, no dependencies), its loops bounded by a
  budget per byte of the stream (:mod:`filters._tnefbounds`: the library loops through
  whatever count a stream declares); its log is silenced (a warning per property).

Bounds: at most ``MAX_FILES`` files per message part, each at most ``max_bytes`` decoded
(a longer one is cut there and flagged ``whole=False``); a block that does not decode is
skipped (``bad=True``), never raised.
"""

from __future__ import annotations

import binascii
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from filters import _tnefbounds

MAX_FILES = 20
MAX_TNEF_DEPTH = 3  # Outlook messages attached inside TNEF, nested
TNEF_SIGNATURE = b"\x78\x9f\x3e\x22"  # 0x223E9F78, little endian

# the mode: any octal digits, as uudecode(1) reads it (%o); other than the usual 3 or 4, the
# block's first line must look encoded (_plausible): prose starts "begin 2 weeks" too
_UU_BEGIN = re.compile(rb"(?m)^begin(-base64)?[ \t]+([0-7]{1,6})[ \t]+([^\r\n]+?)[ \t]*\r?$")
_B64_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
_UU_END = re.compile(rb"(?m)^(?:end|====)[ \t]*\r?$")
_YBEGIN = re.compile(rb"(?m)^=ybegin[ \t]([^\r\n]*)\r?$")
_YEND = re.compile(rb"(?m)^=yend\b")
_BINHEX = re.compile(rb"\(This file must be converted with BinHex 4\.0\)")
_HQX_ALPHABET = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"


@dataclass(frozen=True, slots=True)
class HiddenFile:
    encoding: str  # "uuencode", "yenc", "binhex", "tnef"
    name: str  # as the block names it ("" when it names none)
    data: bytes
    whole: bool = True  # False: cut at max_bytes
    bad: bool = False  # the block is there but does not decode


def may_hide(data: bytes) -> bool:
    """A cheap first look: could ``data`` (a text part's content) hold an encoded file?"""
    return b"begin" in data or b"=ybegin" in data or b"BinHex 4.0" in data


def hidden_files(content_type: str, data: bytes, max_bytes: int) -> Iterator[HiddenFile]:
    """The files hidden in one part's decoded content: a TNEF stream's attachments (known by
    its signature, whatever the part is called), or the encoded blocks of a text part (in the
    order they appear)."""
    if data[:4] == TNEF_SIGNATURE:
        yield from _tnef(data, max_bytes)
        return
    if not content_type.startswith("text/") or not may_hide(data):
        return
    found: list[tuple[int, str, re.Match[bytes]]] = []
    for m in _UU_BEGIN.finditer(data):
        if len(m.group(2)) in (3, 4) or _plausible(data, m):
            found.append((m.start(), "uuencode", m))
    for m in _YBEGIN.finditer(data):
        found.append((m.start(), "yenc", m))
    for m in _BINHEX.finditer(data):
        found.append((m.start(), "binhex", m))
    found.sort(key=lambda f: f[0])
    for _, kind, m in found[:MAX_FILES]:
        if kind == "uuencode":
            yield _uudecode(data, m, max_bytes)
        elif kind == "yenc":
            yield _ydecode(data, m, max_bytes)
        else:
            yield _binhex(data, m.end(), max_bytes)


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip().strip('"')


def _plausible(data: bytes, m: re.Match[bytes]) -> bool:
    """Whether the line after a ``begin`` line is an encoded line: base64 of a length that is
    a multiple of 4, or a uuencoded line exactly as long as its length character says."""
    line = data[m.end():m.end() + 200].lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r \t")
    if m.group(1) is not None:
        return len(line) % 4 == 0 and _B64_LINE.fullmatch(line) is not None
    if not line or not all(32 <= c <= 96 for c in line):
        return False
    n = (line[0] - 32) & 63
    return n > 0 and len(line) - 1 in range((n * 4 + 2) // 3, (n * 4 + 2) // 3 + 3)


def _uudecode(data: bytes, m: re.Match[bytes], max_bytes: int) -> HiddenFile:
    b64, name = m.group(1) is not None, _name(m.group(3))
    end = _UU_END.search(data, m.end())
    body = data[m.end():end.start() if end else len(data)]
    out = bytearray()
    try:
        for line in body.splitlines():
            if b64:
                line = line.strip()
                if line:
                    out += binascii.a2b_base64(line)
            else:
                if not line.strip():
                    continue
                if (line[0] - 32) & 63 == 0:  # the empty line that closes the data
                    break
                n = (((line[0] - 32) & 63) * 4 + 5) // 3  # as the uu module cut padded lines
                out += binascii.a2b_uu(line[:n])
            if len(out) > max_bytes:
                return HiddenFile("uuencode", name, bytes(out[:max_bytes]), whole=False)
    except (binascii.Error, IndexError):
        return HiddenFile("uuencode", name, bytes(out), bad=True)
    return HiddenFile("uuencode", name, bytes(out), bad=not out and end is None)


def _ydecode(data: bytes, m: re.Match[bytes], max_bytes: int) -> HiddenFile:
    params = m.group(1)
    name_at = params.find(b"name=")
    name = _name(params[name_at + 5:]) if name_at >= 0 else ""
    end = _YEND.search(data, m.end())
    body = data[m.end():end.start() if end else len(data)]
    lines = [ln for ln in body.splitlines() if not ln.startswith(b"=ypart")]
    enc = b"".join(lines)[:2 * max_bytes + 2]  # an escape takes two characters
    # "=" escapes the next character (64 more): undo that, then the 42 of every byte, by
    # translate (a byte at a time in Python took seconds a megabyte)
    first, *rest = enc.split(b"=")
    out = first + b"".join(bytes(((seg[0] - 64) & 0xFF,)) + seg[1:] for seg in rest if seg)
    out = out.translate(_Y_TABLE)
    whole = len(out) <= max_bytes
    return HiddenFile("yenc", name, out[:max_bytes], whole=whole, bad=end is None and not out)


_Y_TABLE = bytes((c - 42) & 0xFF for c in range(256))
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_HQX_TO_B64 = bytes.maketrans(_HQX_ALPHABET, _B64_ALPHABET)


def _binhex(data: bytes, at: int, max_bytes: int) -> HiddenFile:
    """RFC 1741's BinHex 4.0: the data fork and the file's name."""
    start = data.find(b":", at)
    stop = data.find(b":", start + 1) if start >= 0 else -1
    if start < 0:
        return HiddenFile("binhex", "", b"", bad=True)
    body = data[start + 1:stop if stop >= 0 else len(data)]
    body = body.translate(None, b" \t\r\n")[:4 * (2 * max_bytes + 1024) // 3]
    if body.translate(None, _HQX_ALPHABET):  # a character outside the alphabet
        return HiddenFile("binhex", "", b"", bad=True)
    # the same 6 bits a character as base64, another alphabet: binascii does the bit work
    b64 = body.translate(_HQX_TO_B64)
    if len(b64) % 4 == 1:  # a lone last character holds no whole byte
        b64 = b64[:-1]
    b64 += b"=" * (-len(b64) % 4)
    try:
        raw = binascii.a2b_base64(b64)
    except binascii.Error:
        return HiddenFile("binhex", "", b"", bad=True)
    out = _unrle90(raw, 64 + max_bytes)
    if len(out) < 1 or len(out) < 1 + out[0] + 20:
        return HiddenFile("binhex", "", b"", bad=True)
    n = out[0]
    name = out[1:1 + n].decode("mac_roman", "replace")
    pos = 1 + n + 1 + 4 + 4 + 2  # name, version, type, creator, flags
    dlen = int.from_bytes(out[pos:pos + 4], "big")
    pos += 4 + 4 + 2  # data length, resource length, header CRC
    fork = bytes(out[pos:pos + min(dlen, max_bytes)])
    whole = dlen <= max_bytes
    return HiddenFile("binhex", name, fork, whole=whole, bad=whole and len(fork) < dlen)


def _unrle90(raw: bytes, cap: int) -> bytearray:
    """BinHex's run-length coding: 0x90 then a count (0: a literal 0x90; n: the byte before
    n times in all), run by run."""
    out = bytearray()
    i, n = 0, len(raw)
    while i < n and len(out) < cap:
        j = raw.find(0x90, i)
        if j < 0 or j + 1 >= n:
            out += raw[i:]
            break
        out += raw[i:j]
        count = raw[j + 1]
        if count == 0:
            out.append(0x90)
        elif out:
            out += out[-1:] * min(count - 1, max(cap - len(out), 0))
        i = j + 2
    return out


def _tnef(data: bytes, max_bytes: int) -> Iterator[HiddenFile]:
    # the library's loops run through the counts the stream declares: bounded (a budget of
    # loops per byte), and a stream the patch cannot bound is not parsed (_tnefbounds)
    if not _tnefbounds.active() or _tnefbounds.problem(data) is not None:
        yield HiddenFile("tnef", "", b"", bad=True)
        return
    # tnefparse logs a warning per property it skips, and more: a hostile stream's, not ours
    # to log (set here, not at import: the gateway's logging set-up comes later)
    logging.getLogger("tnefparse").setLevel(logging.CRITICAL + 1)
    try:
        from tnefparse import TNEF

        with _tnefbounds.budget(data):
            attachments = TNEF(data).attachments
    except (Exception, _tnefbounds.Exhausted):  # noqa: BLE001 - a hostile stream may break it
        yield HiddenFile("tnef", "", b"", bad=True)
        return
    yield from itertools.islice(_tnef_files(attachments, max_bytes, "", 0), MAX_FILES)


def _tnef_files(attachments: list[Any], max_bytes: int, prefix: str,
                depth: int) -> Iterator[HiddenFile]:
    """Each attachment; an attached Outlook message (tnefparse's ``embed``, a TNEF stream of
    its own) by its attachments, named ``<message>/<file>``, up to MAX_TNEF_DEPTH deep."""
    for att in attachments:
        try:
            name = str(att.long_filename() or att.name or "").rstrip("\x00")
        except Exception:  # noqa: BLE001 - a name it cannot decode
            name = ""
        embed = getattr(att, "embed", None)
        if embed is not None and depth < MAX_TNEF_DEPTH:
            yield from _tnef_files(list(getattr(embed, "attachments", [])), max_bytes,
                                   f"{prefix}{name or 'message'}/", depth + 1)
            continue
        content = att.data if isinstance(att.data, bytes) else b""
        yield HiddenFile("tnef", prefix + name, content[:max_bytes],
                         whole=len(content) <= max_bytes)
