"""The ``attachments`` filter: file-name and file-type policy for every MIME leaf part, and for
the names inside zip / tar / gzip / bzip2 / xz / rar archives (nested, within caps).

Reported per offending file (the option is its path: ``a.zip/dir/evil.exe``; control, bidi and
zero-width characters shown as ``\\uXXXX``):

* ``ATTACH_BANNED_EXT`` — the name's extension is in ``banned_extensions`` (trailing dots and
  spaces ignored, as Windows ignores them).
* ``ATTACH_BANNED_TYPE`` — the part's declared Content-Type is in ``banned_types``.
* ``ATTACH_DOUBLE_EXT`` — a document-looking extension followed by a banned one
  (``invoice.pdf.exe``, ``invoice.pdf      .exe``).
* ``ATTACH_BIDI`` — bidirectional control characters in the name (RLO ``invoice\\u202efdp.exe``
  shows as ``invoiceexe.pdf``).
* ``ATTACH_BAD_NAME`` — control or zero-width characters in the name; an archive member path
  that is absolute or climbs out (``../``).
* ``ATTACH_EXECUTABLE`` — the content is a program (PE with a valid ``PE`` header, ELF,
  Mach-O / Java class), whatever it is called.
* ``ATTACH_TYPE_MISMATCH`` — a document/image extension (``.pdf``, ``.jpg`` …) on content that
  is an archive of another kind.
* ``ATTACH_ENCRYPTED`` — an encrypted zip member (its content cannot be checked).
* ``ATTACH_ZIPBOMB`` — a member or stream that expands more than ``max_expansion_ratio`` times
  (and to more than 1 MiB): refused, never unpacked. Declared zip sizes are checked first; the
  bytes really produced are counted too, and decompression stops at the cap.
* ``ATTACH_ARCHIVE_LIMIT`` — not fully checked: deeper than ``max_depth``, more than
  ``max_members`` names, more than ``max_expanded_bytes`` decompressed, a nested archive over
  ``max_nested_bytes``, ``scan_time_s`` spent, or cut short by the MIME parse limit (the
  last part of a message longer than ``gateway.mime.MAX_PARSE_BYTES``; the option says which).
* ``ATTACH_ARCHIVE_UNSUPPORTED`` — 7z, cab, ISO-9660 (recognised by content, not opened), and
  a rar with compressed members: its names are listed and checked (:mod:`filters._rar`), and
  members stored uncompressed are checked by content, but compressed ones cannot be unpacked.
* ``ATTACH_ARCHIVE_BAD`` — looks like an archive but cannot be read (corrupt, truncated).

Files hidden from a MIME walk are checked as attached files (names, content, archives):
uuencoded, yEnc and BinHex 4.0 blocks inside text parts, and the attachments inside TNEF
(``winmail.dat``) parts (:mod:`filters._hidden`); their paths are the part's and their names
(``part1/setup.exe``, ``winmail.dat/invoice.pdf.exe``).

Hard verdict: with ``action = "reject"`` (default) a message carrying any symbol listed in
``action_on`` (default: banned extension/type, double extension, bidi, executable, zip bomb —
the facts Amavis calls BANNED) is refused with ``554 5.7.1`` naming the file; ``"quarantine"``
quarantines it instead; ``"none"`` leaves everything to the policy's scores and rules. Each
symbol carries a default score (used when the policy's ``[scores]`` has none).

The scan runs through ``offload`` (on the event loop for a message up to 64 KiB, in the
worker's CPU thread above); memory is bounded by ``max_nested_bytes`` per nesting level,
work by ``max_expanded_bytes`` and ``scan_time_s``.
"""

from __future__ import annotations

import io
import time
import unicodedata
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from filters import _hidden, _rar
from filters._filekinds import (
    CHUNK,
    ascii_name,
    decompress,
    extensions,
    gzip_fname,
    is_office,
    open_zip,
    part_names,
    show,
    sniff,
    strip_suffix,
    zip_infos,
)
from gateway import mime
from gateway.filterapi import (
    Action,
    ConfigError,
    Filter,
    FilterContext,
    Result,
    Symbol,
    Verdict,
    offload,
)
from gateway.replies import Reply
from gateway.services import Services
from gateway.settings import (
    action_setting,
    boolean,
    check_keys,
    integer,
    positive,
    str_list,
    symbol_list,
)

if TYPE_CHECKING:
    import zipfile

# Gmail's refused-attachment list (support.google.com/mail/answer/6590), plus registry files,
# VHDX, ClickOnce and shell-link variants. Disk images (iso, img, vhd, vhdx) are here because
# they were the 2022-23 way around Mark-of-the-Web (Qakbot, IcedID, Emotet); legitimate mail
# rarely carries them. Admins who need one drop it from the list.
DEFAULT_BANNED_EXTENSIONS = (
    "ade", "adp", "apk", "appx", "appxbundle", "application", "appref-ms", "bat", "cab", "chm",
    "cmd", "com", "cpl", "diagcab", "diagcfg", "diagpack", "dll", "dmg", "ex_", "exe", "gadget",
    "hta", "img", "inf", "ins", "iso", "isp", "jar", "jnlp", "js", "jse", "lib", "lnk", "mde",
    "msc", "msi", "msix", "msixbundle", "msp", "mst", "nsh", "pif", "ps1", "psm1", "reg", "scf",
    "scr", "sct", "settingcontent-ms", "shb", "sys", "url", "vb", "vbe", "vbs", "vhd", "vhdx",
    "vxd", "wsc", "wsf", "wsh", "xll",
)
DEFAULT_BANNED_TYPES = (
    "application/x-msdownload", "application/x-msdos-program", "application/x-dosexec",
    "application/x-executable", "application/vnd.microsoft.portable-executable",
    "application/x-ms-installer", "application/x-msi", "application/x-ms-shortcut",
    "application/hta", "application/x-ms-application", "application/x-sh",
)
# Extensions that make a name look like a document (the first half of a double extension).
DOC_EXTENSIONS = frozenset((
    "pdf", "doc", "docx", "docm", "xls", "xlsx", "xlsm", "ppt", "pptx", "odt", "ods", "odp",
    "rtf", "txt", "csv", "htm", "html", "xml", "jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff",
    "svg", "mp3", "mp4", "wav", "avi", "mov", "zip", "rar", "7z", "eml", "msg", "ics", "vcf",
))
# What the content of a document/image extension looks like (for ATTACH_TYPE_MISMATCH).
EXPECTED_KIND = {
    "pdf": "pdf", "jpg": "jpeg", "jpeg": "jpeg", "png": "png", "gif": "gif",
    "doc": "cfb", "xls": "cfb", "ppt": "cfb", "docx": "zip", "xlsx": "zip", "pptx": "zip",
    "docm": "zip", "xlsm": "zip", "odt": "zip", "ods": "zip", "odp": "zip", "txt": "text",
    "csv": "text", "rtf": "text",
}
SYMBOLS = {  # name -> default score
    "ATTACH_BANNED_EXT": 10.0, "ATTACH_BANNED_TYPE": 10.0, "ATTACH_DOUBLE_EXT": 10.0,
    "ATTACH_BIDI": 10.0, "ATTACH_EXECUTABLE": 10.0, "ATTACH_ZIPBOMB": 15.0,
    "ATTACH_BAD_NAME": 3.0, "ATTACH_TYPE_MISMATCH": 4.0, "ATTACH_ENCRYPTED": 3.0,
    "ATTACH_ARCHIVE_LIMIT": 2.0, "ATTACH_ARCHIVE_UNSUPPORTED": 1.0, "ATTACH_ARCHIVE_BAD": 3.0,
}
DEFAULT_ACTION_ON = ("ATTACH_BANNED_EXT", "ATTACH_BANNED_TYPE", "ATTACH_DOUBLE_EXT",
                     "ATTACH_BIDI", "ATTACH_EXECUTABLE", "ATTACH_ZIPBOMB")

BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e")
ARCHIVES = frozenset(("zip", "tar", "gzip", "bzip2", "xz"))
UNSUPPORTED = frozenset(("rar", "7z", "cab", "iso"))  # rar: listed (filters._rar), not unpacked
OPENED = ARCHIVES | {"rar"}  # kinds whole members are kept for (to open them)
EXECUTABLES = frozenset(("pe", "elf", "macho"))
RATIO_MIN_BYTES = 1024 * 1024  # below this much output, no ratio is a bomb
HEAD_BYTES = 64 * 1024  # what is read of a member that is not itself an archive
MAX_OPTIONS = 20  # per symbol


class _Stop(Exception):
    """Stop scanning the current attachment (a bomb or a global cap was found)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_depth: int = 3
    max_members: int = 1000
    max_expansion_ratio: float = 100.0
    max_expanded_bytes: int = 100 * 1024 * 1024
    max_nested_bytes: int = 16 * 1024 * 1024
    scan_time_s: float = 10.0


DEFAULT_LIMITS = Limits()


@dataclass
class _Scan:
    """One message's scan: findings, and the budgets shared by all its attachments."""

    banned_ext: frozenset[str]
    limits: Limits
    deadline: float
    members: int = 0
    expanded: int = 0
    found: dict[str, list[str]] = field(default_factory=dict)
    first: list[tuple[str, str]] = field(default_factory=list)  # (symbol, raw path), in order
    cut: str | None = None  # the part the MIME parse limit cut short: it cannot be "bad"

    def add(self, symbol: str, path: str) -> None:
        if symbol == "ATTACH_ARCHIVE_BAD" and self.cut is not None \
                and (path == self.cut or path.startswith(self.cut + "/")):
            symbol, path = "ATTACH_ARCHIVE_LIMIT", f"{self.cut}: cut by the parse limit"
        opts = self.found.setdefault(symbol, [])
        shown = show(path)
        if symbol == "ATTACH_ARCHIVE_LIMIT":  # the first path per reason is enough
            reason = shown.rpartition(": ")[2]
            if any(o.rpartition(": ")[2] == reason for o in opts):
                return
        if shown not in opts and len(opts) < MAX_OPTIONS:
            opts.append(shown)
        self.first.append((symbol, path))

    def tick(self, path: str) -> None:
        if time.monotonic() > self.deadline:
            self.add("ATTACH_ARCHIVE_LIMIT", f"{path}: time")
            raise _Stop

    def spend(self, n: int, path: str) -> None:
        self.expanded += n
        if self.expanded > self.limits.max_expanded_bytes:
            self.add("ATTACH_ARCHIVE_LIMIT", f"{path}: expanded bytes")
            raise _Stop


class AttachmentsFilter(Filter):
    name = "attachments"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    def __init__(self, banned_ext: frozenset[str], banned_types: frozenset[str],
                 limits: Limits, action: Action | None, action_on: frozenset[str],
                 scan_text_parts: bool = True) -> None:
        self.banned_ext = banned_ext
        self.banned_types = banned_types
        self.limits = limits
        self.action = action
        self.action_on = action_on
        self.scan_text_parts = scan_text_parts

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> AttachmentsFilter:
        check_keys(cfg, {"banned_extensions", "banned_types", "max_depth", "max_members",
                         "max_expansion_ratio", "max_expanded_bytes", "max_nested_bytes",
                         "scan_time_s", "action", "action_on", "scan_text_parts"})
        exts = str_list(cfg, "banned_extensions") if "banned_extensions" in cfg \
            else DEFAULT_BANNED_EXTENSIONS
        norm_ext = set()
        for e in exts:
            e2 = e.strip().lstrip(".").lower()
            if not e2 or "." in e2 or "/" in e2:
                raise ConfigError("banned_extensions", f"{e!r} is not an extension")
            norm_ext.add(e2)
        types = str_list(cfg, "banned_types") if "banned_types" in cfg else DEFAULT_BANNED_TYPES
        for t in types:
            if t.count("/") != 1 or " " in t:
                raise ConfigError("banned_types", f"{t!r} is not a MIME type")
        limits = Limits(
            max_depth=integer(cfg, "max_depth", DEFAULT_LIMITS.max_depth, 0),
            max_members=integer(cfg, "max_members", DEFAULT_LIMITS.max_members, 1),
            max_expansion_ratio=positive(cfg, "max_expansion_ratio",
                                         DEFAULT_LIMITS.max_expansion_ratio),
            max_expanded_bytes=integer(cfg, "max_expanded_bytes", DEFAULT_LIMITS.max_expanded_bytes, 1),
            max_nested_bytes=integer(cfg, "max_nested_bytes", DEFAULT_LIMITS.max_nested_bytes, 1),
            scan_time_s=positive(cfg, "scan_time_s", DEFAULT_LIMITS.scan_time_s),
        )
        return cls(frozenset(norm_ext), frozenset(t.lower() for t in types), limits,
                   action_setting(cfg), symbol_list(cfg, "action_on", SYMBOLS, DEFAULT_ACTION_ON),
                   boolean(cfg, "scan_text_parts", True))

    async def on_message(self, ctx: FilterContext) -> Result:
        assert ctx.message is not None
        view = await mime.view(ctx.message)
        return await offload(ctx.message.size, self.check_view, view)

    # --- the scan (blocking: offload) ---------------------------------------------------

    def check_view(self, view: mime.MimeView) -> Result:
        scan = _Scan(self.banned_ext, self.limits,
                     time.monotonic() + self.limits.scan_time_s)
        for part in view.parts:
            names = part_names(part)
            path = names[0] if names else f"part{part.index + 1}"
            # the message was longer than the parse limit: its last part is cut short, so an
            # archive there cannot be read to its end — not checked fully, not damaged
            scan.cut = path if view.truncated and part is view.parts[-1] else None
            try:  # files encoded inside it (uuencode, yEnc, BinHex) or packed in it (TNEF)
                self.check_hidden(scan, path, part)
            except _Stop:
                pass
            if part.is_text and not part.filename and not self.scan_text_parts:
                continue
            for n in names:
                self.check_name(scan, n, n, archived=False)
            if part.content_type in self.banned_types:
                scan.add("ATTACH_BANNED_TYPE", f"{path} ({part.content_type})")
            try:
                scan.tick(path)
                self.check_blob(scan, path, path, part.payload, depth=0)
            except _Stop:
                pass
        return self.result(scan)

    def check_hidden(self, scan: _Scan, path: str, part: mime.Part) -> None:
        """Each file hidden in the part (filters._hidden) checked as an attached file: its
        name, its content, and the archive it may be. Its path is the part's, then its name
        (``part1/setup.exe``, ``winmail.dat/report.pdf.exe``)."""
        for hidden in _hidden.hidden_files(part.content_type, part.payload,
                                           self.limits.max_nested_bytes):
            name = hidden.name or hidden.encoding
            hpath = f"{path}/{name}"
            self.count_member(scan, hpath)
            if hidden.bad:
                scan.add("ATTACH_ARCHIVE_BAD", f"{hpath} ({hidden.encoding})")
                continue
            scan.spend(len(hidden.data), hpath)
            if not hidden.whole:
                scan.add("ATTACH_ARCHIVE_LIMIT", f"{hpath}: nested size")
            self.check_name(scan, name, hpath, archived=True)
            self.check_blob(scan, hpath, name, hidden.data,
                            depth=1 if hidden.encoding == "tnef" else 0, whole=hidden.whole)

    def result(self, scan: _Scan) -> Result:
        symbols = tuple(Symbol(name, tuple(opts), SYMBOLS[name])
                        for name, opts in scan.found.items())
        verdict = None
        if self.action is not None:
            hit = next(((s, p) for s, p in scan.first if s in self.action_on), None)
            if hit is not None:
                sym, path = hit
                reply = Reply(554, "5.7.1", f"Banned attachment refused: "
                                            f"\"{ascii_name(path)}\" ({sym})")
                verdict = Verdict(self.action, reply if self.action is Action.REJECT else None,
                                  f"{sym} {show(path)}")
        return Result(symbols=symbols, verdict=verdict,
                      data={"expanded_bytes": scan.expanded, "members": scan.members})

    def check_name(self, scan: _Scan, name: str, path: str, *, archived: bool) -> None:
        if any(ch in BIDI for ch in name):
            scan.add("ATTACH_BIDI", path)
        if any(ch in ZERO_WIDTH or unicodedata.category(ch) == "Cc" for ch in name):
            scan.add("ATTACH_BAD_NAME", path)
        elif archived and (name.startswith(("/", "\\")) or ".." in name.replace("\\", "/")
                           .split("/")):
            scan.add("ATTACH_BAD_NAME", path)
        cleaned = "".join(ch for ch in name if ch not in BIDI and ch not in ZERO_WIDTH)
        exts = extensions(cleaned)
        if not exts:
            return
        if exts[-1] in self.banned_ext:
            scan.add("ATTACH_BANNED_EXT", path)
            if len(exts) >= 2 and exts[-2] in DOC_EXTENSIONS:
                scan.add("ATTACH_DOUBLE_EXT", path)

    def check_blob(self, scan: _Scan, path: str, name: str, data: bytes, depth: int,
                   whole: bool = True) -> None:
        """Sniff one file's content (``whole``, or only its head) and open it when it is an
        archive we have all of."""
        kind = sniff(data)
        if kind is None and name.lower().endswith(".tar") and len(data) >= 512:
            kind = "tar"
        if kind in EXECUTABLES:
            scan.add("ATTACH_EXECUTABLE", path)
            return
        exts = extensions(name)
        ext = exts[-1] if exts else ""
        expected = EXPECTED_KIND.get(ext)
        if expected is not None and kind is not None and kind != expected \
                and (kind in ARCHIVES or kind in UNSUPPORTED):
            scan.add("ATTACH_TYPE_MISMATCH", f"{path} ({kind})")
        if kind == "rar" and whole:
            if depth >= self.limits.max_depth:
                scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: depth")
            else:
                self.scan_rar(scan, path, data, depth + 1)
            return
        if kind in UNSUPPORTED:
            scan.add("ATTACH_ARCHIVE_UNSUPPORTED", f"{path} ({kind})")
            return
        if kind not in ARCHIVES or not whole \
                or (kind == "zip" and expected == "zip" and is_office(data)):
            return
        if depth >= self.limits.max_depth:
            if kind == "zip":  # too deep to open, but a bomb's declared sizes still show
                self.check_declared(scan, path, zip_infos(data) or [])
            scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: depth")
            return
        if kind == "zip":
            self.scan_zip(scan, path, data, depth + 1)
        elif kind == "tar":
            self.scan_tar(scan, path, data, depth + 1)
        else:
            self.scan_stream(scan, path, name, kind, data, depth + 1)

    def count_member(self, scan: _Scan, path: str) -> None:
        scan.members += 1
        if scan.members > self.limits.max_members:
            scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: members")
            raise _Stop
        scan.tick(path)

    def scan_zip(self, scan: _Scan, path: str, data: bytes, depth: int) -> None:
        import lzma  # the archive modules load with the first archive, not with the filter
        import zipfile

        try:
            zf = open_zip(data)
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError):
            scan.add("ATTACH_ARCHIVE_BAD", path)
            return
        if len(infos) + scan.members > self.limits.max_members:
            scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: members")
            infos = infos[:max(0, self.limits.max_members - scan.members)]
        self.check_declared(scan, path, infos)  # a bomb is refused before anything is read
        if sum(i.file_size for i in infos) > self.limits.max_expanded_bytes - scan.expanded:
            scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: expanded bytes")
            raise _Stop
        for info in infos:
            mpath = f"{path}/{info.filename}"
            self.count_member(scan, mpath)
            self.check_name(scan, info.filename, mpath, archived=True)
            if info.is_dir():
                continue
            if info.flag_bits & 0x1:
                scan.add("ATTACH_ENCRYPTED", mpath)
                continue
            try:
                content, whole = self.read_member(scan, mpath, zf.open(info),
                                                  info.compress_size)
            except _Stop:
                raise
            except NotImplementedError:
                scan.add("ATTACH_ARCHIVE_UNSUPPORTED", f"{mpath} (method "
                                                       f"{info.compress_type})")
                continue
            except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, ValueError, OSError,
                    EOFError, RuntimeError):
                scan.add("ATTACH_ARCHIVE_BAD", mpath)
                continue
            self.check_blob(scan, mpath, info.filename, content, depth, whole)

    def scan_rar(self, scan: _Scan, path: str, data: bytes, depth: int) -> None:
        """A RAR's member names checked (filters._rar); stored members' content too. When a
        member is compressed (no unrar here) the archive is still flagged unsupported."""
        try:
            listed = list(_rar.members(data))
        except _rar.NoLibrary:
            scan.add("ATTACH_ARCHIVE_UNSUPPORTED", f"{path} (rar)")
            return
        except _rar.Unreadable:
            scan.add("ATTACH_ARCHIVE_BAD", path)
            return
        unpacked = True
        for m in listed:
            mpath = f"{path}/{m.name}"
            self.count_member(scan, mpath)
            self.check_name(scan, m.name, mpath, archived=True)
            if m.is_dir:
                continue
            if m.encrypted:
                scan.add("ATTACH_ENCRYPTED", mpath)
                continue
            if m.open is None:
                unpacked = False
                continue
            try:
                content, whole = self.read_member(scan, mpath, m.open(), max(m.size, 1))
            except _Stop:
                raise
            except Exception as e:  # noqa: BLE001 - rarfile's errors on a damaged member
                if not (_rar.is_error(e) or isinstance(e, (OSError, ValueError, EOFError))):
                    raise
                scan.add("ATTACH_ARCHIVE_BAD", mpath)
                continue
            self.check_blob(scan, mpath, m.name, content, depth, whole)
        if not unpacked:
            scan.add("ATTACH_ARCHIVE_UNSUPPORTED", f"{path} (rar)")

    def check_declared(self, scan: _Scan, path: str, infos: list[zipfile.ZipInfo]) -> None:
        ratio = self.limits.max_expansion_ratio
        for info in infos:
            if info.file_size > RATIO_MIN_BYTES and \
                    info.file_size > ratio * max(info.compress_size, 1):
                scan.add("ATTACH_ZIPBOMB", f"{path}/{info.filename}")
                raise _Stop

    def read_member(self, scan: _Scan, path: str, stream: IO[bytes],
                    compressed: int) -> tuple[bytes, bool]:
        """A member's head, or all of it when it is an archive to open (up to
        ``max_nested_bytes``), and whether that is the whole member; every byte produced is
        counted against the budgets."""
        limits = self.limits
        buf = bytearray()
        total = 0
        keep = HEAD_BYTES
        with stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                scan.spend(len(chunk), path)
                if total > RATIO_MIN_BYTES and total > limits.max_expansion_ratio * \
                        max(compressed, 1):
                    scan.add("ATTACH_ZIPBOMB", path)
                    raise _Stop
                if len(buf) < keep:
                    buf += chunk
                    if keep == HEAD_BYTES and len(buf) >= 262:
                        k = sniff(bytes(buf))
                        if k in OPENED:
                            keep = limits.max_nested_bytes + 1
                if len(buf) >= keep:
                    if keep == HEAD_BYTES:
                        break  # not an archive: its head is all we need
                    scan.add("ATTACH_ARCHIVE_LIMIT", f"{path}: nested size")
                    return bytes(buf[:HEAD_BYTES]), False
                scan.tick(path)
        return bytes(buf), True

    def scan_tar(self, scan: _Scan, path: str, data: bytes, depth: int) -> None:
        import tarfile

        try:
            tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        except (tarfile.TarError, ValueError, OSError, EOFError):
            scan.add("ATTACH_ARCHIVE_BAD", path)
            return
        try:
            while True:
                try:
                    member = tf.next()
                except (tarfile.TarError, ValueError, OSError, EOFError):
                    scan.add("ATTACH_ARCHIVE_BAD", path)
                    return
                if member is None:
                    return
                mpath = f"{path}/{member.name}"
                self.count_member(scan, mpath)
                self.check_name(scan, member.name, mpath, archived=True)
                if not member.isfile():
                    continue
                f = tf.extractfile(member)
                if f is None:
                    continue
                try:
                    content, whole = self.read_member(scan, mpath, f, max(member.size, 1))
                except (tarfile.TarError, ValueError, OSError, EOFError):
                    scan.add("ATTACH_ARCHIVE_BAD", mpath)
                    return
                self.check_blob(scan, mpath, member.name, content, depth, whole)
        finally:
            tf.close()

    def scan_stream(self, scan: _Scan, path: str, name: str, kind: str, data: bytes,
                    depth: int) -> None:
        """A single compressed stream (gzip, bzip2, xz): the inner name (gzip FNAME, else the
        outer name without its compression suffix) checked, the content decompressed in
        chunks under the ratio and byte caps, then sniffed like any file."""
        import lzma

        inner = gzip_fname(data) if kind == "gzip" else None
        if not inner:
            inner = strip_suffix(name.replace("\\", "/").rsplit("/", 1)[-1], kind)
        ipath = f"{path}/{inner}"
        self.check_name(scan, inner, ipath, archived=True)
        limits = self.limits
        buf = bytearray()
        total = 0
        keep = HEAD_BYTES
        truncated = False
        try:
            for chunk in decompress(kind, data):
                total += len(chunk)
                scan.spend(len(chunk), ipath)
                if total > RATIO_MIN_BYTES and total > limits.max_expansion_ratio * len(data):
                    scan.add("ATTACH_ZIPBOMB", path)
                    raise _Stop
                if len(buf) < keep:
                    buf += chunk
                    if keep == HEAD_BYTES and len(buf) >= 262 and sniff(bytes(buf)) in OPENED:
                        keep = limits.max_nested_bytes + 1
                    if len(buf) >= keep and keep > HEAD_BYTES:
                        scan.add("ATTACH_ARCHIVE_LIMIT", f"{ipath}: nested size")
                        truncated = True
                        del buf[HEAD_BYTES:]
                        keep = HEAD_BYTES
                scan.tick(ipath)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
            scan.add("ATTACH_ARCHIVE_BAD", path)
            return
        content = bytes(buf)
        k = sniff(content)
        if k is None and inner.lower().endswith(".tar") and len(content) >= 512:
            k = "tar"
        if k == "tar" and not truncated:  # a .tar.gz: list its members under the outer name
            self.scan_tar(scan, path, content, depth)
        else:
            self.check_blob(scan, ipath, inner, content, depth, not truncated)
