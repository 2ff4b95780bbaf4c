"""Build the message that leaves the gateway: the trace headers mailgate prepends (Received:,
X-Spam-*), the filters' header edits and the subject rewrite, applied once, streaming the body
from the spool file."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gateway.filterapi import Action, AddHeader, Edit, RemoveHeader
from gateway.message import Header, Message

MAX_HEADER_LINE = 78


def fold(name: str, value: str) -> bytes:
    """``Name: value`` folded at whitespace to keep lines short, CRLF-terminated."""
    words = value.split(" ")
    lines: list[str] = []
    cur = f"{name}:"
    for w in words:
        if len(cur) + 1 + len(w) > MAX_HEADER_LINE and cur.strip() not in (f"{name}:", ""):
            lines.append(cur)
            cur = "\t" + w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class TraceInfo:
    hostname: str
    qid: str
    client_ip: str
    helo: str | None
    protocol: str  # ESMTP, ESMTPS, SMTP, UTF8SMTPS ... (RFC 3848)
    rcpt: str | None  # "for <addr>" only when there is exactly one recipient


def received_header(t: TraceInfo, now: float | None = None) -> bytes:
    return fold("Received", received_value(t, now))


def received_value(t: TraceInfo, now: float | None = None) -> str:
    """The Received: field's value, unfolded."""
    helo = t.helo or "unknown"
    ip = f"IPv6:{t.client_ip}" if ":" in t.client_ip else t.client_ip
    rcpt = f" for <{t.rcpt}>" if t.rcpt else ""
    date = email.utils.formatdate(now, localtime=False, usegmt=True)
    return (f"from {helo} ([{ip}]) by {t.hostname} (mailgate) with {t.protocol} id {t.qid}"
            f"{rcpt}; {date}")


def raw_field(name: str, value: str) -> bytes:
    """``Name: value`` with the value's own folding kept (line ends made CRLF); a line break
    that is not followed by whitespace (no fold) becomes a space. For signature headers, whose
    signature covers the value as written."""
    lines = re.split(r"\r?\n", value.strip("\r\n"))
    text = lines[0]
    for line in lines[1:]:
        if line.strip():
            text += ("\r\n" + line) if line[:1] in (" ", "\t") else (" " + line)
    if not text.startswith((" ", "\t")):
        text = " " + text
    return f"{name}:{text}\r\n".encode()


def _sanitize(value: str) -> str:
    if "\r" not in value and "\n" not in value:
        return value
    return re.sub(r"[\r\n]+", " ", value)


def build_headers(message: Message, prepend: Iterable[tuple[str, str]], edits: Iterable[Edit],
                  *, action: Action, subject_tag: str) -> bytes:
    """The new header block (prepended trace headers first, then the edited originals)."""
    out: list[bytes] = [fold(n, _sanitize(v)) for n, v in prepend]
    removes = [e for e in edits if isinstance(e, RemoveHeader)]
    adds = [e for e in edits if isinstance(e, AddHeader)]
    out.extend(fold(e.name, _sanitize(e.value)) for e in adds)
    if action is not Action.REWRITE_SUBJECT and not _may_remove(message, removes):
        lines = message.header_lines  # nothing in the block changes: copy it whole
        if lines is not None:
            out.append(lines)
            return b"".join(out)
    tagged = False
    for h in message.headers:
        if any(_removes(r, h) for r in removes):
            continue
        if action is Action.REWRITE_SUBJECT and not tagged and h.name.lower() == "subject":
            tagged = True
            if not h.value.startswith(subject_tag):
                out.append(fold("Subject", f"{subject_tag} {h.value}"))
                continue
        out.append(h.raw)
    if action is Action.REWRITE_SUBJECT and not tagged:
        out.append(fold("Subject", subject_tag))
    return b"".join(out)


def _may_remove(message: Message, removes: list[RemoveHeader]) -> bool:
    """Whether any of ``removes`` may name a header of ``message``: False when none of their
    names (ASCII) occurs anywhere in the header block, in any case."""
    if not removes:
        return False
    block = message.header_bytes.lower()
    for r in removes:
        name = r.name.lower()
        if not name.isascii() or name.encode() in block:
            return True
    return False


def _removes(r: RemoveHeader, h: Header) -> bool:
    name = h.name.lower()
    if not (name.startswith(r.name.lower()) if r.name_prefix else name == r.name.lower()):
        return False
    return r.value_prefix is None or h.value.startswith(r.value_prefix)


def outgoing_head(message: Message, new_headers: bytes) -> bytes:
    """What replaces the received header block (``message.body_offset`` bytes) in the
    outgoing message: the edited header block and, if the original had one, the blank line."""
    if message.header_bytes.endswith(b"\r\n\r\n") or message.header_bytes == b"\r\n":
        return new_headers + b"\r\n"
    return new_headers


def queued_form(message: Message, new_headers: bytes, max_prepend_bytes: int
                ) -> tuple[bytes, int] | None:
    """The outgoing message as (``prepend``, ``skip``) over the received file: ``prepend``
    then the file after its first ``skip`` bytes. Usually the received header block is kept
    as it is and only the new lines go before it (skip 0); when edits changed it, the whole
    edited block replaces it. None when that block is over ``max_prepend_bytes`` (write the
    message out instead: the queue's metadata stays small)."""
    head = outgoing_head(message, new_headers)
    if head.endswith(message.header_bytes):
        return head[:len(head) - len(message.header_bytes)], 0
    if len(head) <= max_prepend_bytes:
        return head, message.body_offset
    return None


def message_chunks(message: Message, new_headers: bytes, block: int = 256 * 1024
                   ) -> Iterator[bytes]:
    """The outgoing message: edited header block, the blank line, then the original body."""
    yield outgoing_head(message, new_headers)
    with message.path.open("rb") as f:
        f.seek(message.body_offset)
        while chunk := f.read(block):
            yield chunk
