"""RAR archives (RAR 1.5-4 and RAR 5) listed for the ``attachments`` filter through the
``rarfile`` library: each member's name, declared size, whether it is a directory or
encrypted, and — for members stored without compression, which rarfile reads itself — a
stream of its content. Compressed members cannot be unpacked here (that takes the non-free
``unrar`` program, which the gateway never runs: the library's tool settings point nowhere,
so a compressed RAR 3 comment is an unreadable archive rather than a subprocess).

rarfile is imported at the first RAR (measured: 23 ms, +6 MB RSS on a warm cache), not with
the filter. Any failure to read the headers (corrupt, truncated, encrypted headers) is
:class:`Unreadable`; a missing library is :class:`NoLibrary` (the archive is then flagged
unsupported, as before).

7z is not listed: py7zr, the maintained reader, costs 215 ms and +15 MB RSS at import and
nine compiled dependencies, and decodes a 7z's compressed header up to 256 MiB before any
check of ours can run (a 40 KB attachment could make a worker allocate that). 7z stays
flagged ``ATTACH_ARCHIVE_UNSUPPORTED``; clamd unpacks it for viruses.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

NO_TOOL = "/nonexistent/mailgate-runs-no-unrar"


class NoLibrary(Exception):
    """rarfile is not installed."""


class Unreadable(Exception):
    """The archive's headers cannot be read."""


@dataclass(frozen=True, slots=True)
class RarMember:
    name: str
    size: int  # declared, uncompressed
    is_dir: bool
    encrypted: bool
    # a stored (uncompressed, clear) member's content as a stream; None: not readable here
    open: Callable[[], IO[bytes]] | None


_lib: Any = None


def _rarfile() -> Any:
    global _lib
    if _lib is None:
        try:
            import rarfile
        except ImportError as e:
            raise NoLibrary(str(e)) from None
        for tool in ("UNRAR_TOOL", "UNAR_TOOL", "BSDTAR_TOOL", "SEVENZIP_TOOL",
                     "SEVENZIP2_TOOL"):
            setattr(rarfile, tool, NO_TOOL)  # its documented settings: never a subprocess
        _lib = rarfile
    return _lib


def members(data: bytes) -> Iterator[RarMember]:
    """The archive's members in order; Unreadable (before the first one) when its headers
    cannot be read."""
    rarfile = _rarfile()
    try:
        rf = rarfile.RarFile(io.BytesIO(data), errors="strict")  # a damaged header raises
        if rf.needs_password():  # encrypted headers: not even the names are readable
            raise Unreadable("encrypted headers")
        infos = rf.infolist()
    except Unreadable:
        raise
    except Exception as e:  # noqa: BLE001 - rarfile's errors, and what hostile bytes cause
        raise Unreadable(f"{type(e).__name__}: {e}") from None
    for info in infos:
        encrypted = bool(info.needs_password())
        stored = (info.compress_type == rarfile.RAR_M0 and not encrypted
                  and info.file_redir is None and not info.is_dir())
        yield RarMember(str(info.filename), int(info.file_size or 0), bool(info.is_dir()),
                        encrypted, _opener(rf, info) if stored else None)


def _opener(rf: Any, info: Any) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        stream: IO[bytes] = rf.open(info)
        return stream

    return open_member


def is_error(e: BaseException) -> bool:
    """Whether ``e`` is rarfile's own error (reading a stored member: a bad CRC, a cut file)."""
    lib = _lib
    return lib is not None and isinstance(e, lib.Error)
