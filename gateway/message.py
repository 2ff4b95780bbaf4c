"""A received message as the filters see it: parsed headers and a readable body, backed by
the spool file that DATA streamed into (the message is never held in memory whole)."""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, BinaryIO, cast

from gateway.mimebounds import DEFAULT_LIMITS, MimeLimits

MAX_HEADER_BYTES = 1024 * 1024  # headers beyond this are treated as body for parsing


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str  # unfolded, undecoded (raw text with RFC 2047 words as sent)
    raw: bytes  # the header exactly as received, folding and CRLF included


def split_headers(header_block: bytes) -> list[Header]:
    """Split a CRLF header block into headers, keeping each one's raw bytes."""
    out: list[Header] = []
    lines = header_block.split(b"\r\n")
    current: list[bytes] = []

    def flush() -> None:
        if not current:
            return
        raw = b"\r\n".join(current) + b"\r\n"
        name, _, value = raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        out.append(Header(name.decode("ascii", "replace").strip(),
                          " ".join(text.split()), raw))
        current.clear()

    for line in lines:
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
        else:
            flush()
            current.append(line)
    flush()
    return out


@dataclass(frozen=True, slots=True)
class Message:
    """A spooled message: ``path`` holds the CRLF-clean, unstuffed message bytes."""

    path: Path
    size: int
    header_bytes: bytes  # the header block including the blank line that ends it (if any)
    # what filters derive from the message once and share (e.g. gateway.mime's parse)
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # the structural bounds of its MIME parse (gateway.mime; [limits] max_mime_* in the policy)
    mime_limits: MimeLimits = field(default=DEFAULT_LIMITS, compare=False, repr=False)
    _headers: tuple[Header, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def headers(self) -> tuple[Header, ...]:
        """The header block split into headers, at first use: a relay whose filters read no
        header never splits it (``edits.build_headers`` copies an unedited block whole)."""
        headers = self._headers
        if headers is None:
            headers = tuple(split_headers(self.header_bytes))
            object.__setattr__(self, "_headers", headers)
        return headers

    @property
    def header_lines(self) -> bytes | None:
        """The header block without the blank line that ends it: the headers' ``raw`` bytes
        joined, read off the block without splitting it. None when the block's last line has
        no CRLF (only the split form then says what the headers are)."""
        block = self.header_bytes
        if block.endswith(b"\r\n\r\n") or block == b"\r\n":
            return block[:-2]
        if block.endswith(b"\r\n") or not block:
            return block
        return None

    @classmethod
    def from_spool(cls, path: Path, size: int,
                   mime_limits: MimeLimits = DEFAULT_LIMITS) -> Message:
        with path.open("rb") as f:
            head = f.read(min(size, MAX_HEADER_BYTES))
        return cls.from_head(path, size, head, mime_limits)

    @classmethod
    def from_head(cls, path: Path, size: int, head: bytes,
                  mime_limits: MimeLimits = DEFAULT_LIMITS) -> Message:
        """From the file's first bytes, as far as its header block or MAX_HEADER_BYTES (a
        ``HeadCapture`` of the DATA that wrote it): the same Message as ``from_spool``."""
        end = head.find(b"\r\n\r\n")
        if head.startswith(b"\r\n"):
            block = b"\r\n"
        elif end >= 0:
            block = head[: end + 4]
        elif len(head) == size:  # headers only, no body
            block = head
        else:  # no end of headers within the cap: keep whole lines only
            cut = head.rfind(b"\r\n")
            block = head[: cut + 2] if cut >= 0 else b""
        return cls(path, size, block, mime_limits=mime_limits)

    @property
    def body_offset(self) -> int:
        return len(self.header_bytes)

    def get_all(self, name: str) -> list[str]:
        n = name.lower()
        return [h.value for h in self.headers if h.name.lower() == n]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def open_body(self) -> BinaryIO:
        f = self.path.open("rb")
        f.seek(self.body_offset)
        return f

    def read_body(self, max_bytes: int) -> bytes:
        with self.open_body() as f:
            return f.read(max_bytes)

    def iter_bytes(self, block: int = 256 * 1024) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            while chunk := f.read(block):
                yield chunk

    def parsed_headers(self) -> EmailMessage:
        """The header block parsed by the stdlib (RFC 2047 decoding, address parsing)."""
        parser = email.parser.BytesParser(policy=email.policy.default)
        return cast(EmailMessage, parser.parsebytes(self.header_bytes, headersonly=True))

    def parse(self, max_bytes: int = 10 * 1024 * 1024) -> EmailMessage:
        """The whole message parsed as MIME (up to ``max_bytes``; filters cap their work)."""
        with self.path.open("rb") as f:
            data = f.read(max_bytes)
        parser = email.parser.BytesParser(policy=email.policy.default)
        return cast(EmailMessage, parser.parsebytes(data))


class HeadCapture:
    """Keeps the first bytes written to a message file, up to the end of its header block or
    MAX_HEADER_BYTES, so the end of DATA needs no read back (``Message.from_head``). Only the
    header block is kept once its end is seen (not the body that came in the same block:
    the capture lives as long as the transaction, through the filters and the commit)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        seen = len(self._buf)
        self._buf += data[:MAX_HEADER_BYTES - seen]
        if self._buf.startswith(b"\r\n"):
            del self._buf[2:]
            self.done = True
            return
        end = self._buf.find(b"\r\n\r\n", max(seen - 3, 0))
        if end >= 0:
            del self._buf[end + 4:]
            self.done = True
        elif len(self._buf) >= MAX_HEADER_BYTES:
            self.done = True

    @property
    def head(self) -> bytes:
        return bytes(self._buf)

    def take(self) -> bytes:
        """The captured bytes, handed over: the capture keeps no copy of them afterwards (it
        would live through the filters beside the Message made from them)."""
        head = bytes(self._buf)
        self._buf = bytearray()
        self.done = True
        return head

