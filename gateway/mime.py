"""One MIME parse of a message, shared by the content filters (rules, bayes, uribl,
attachments, …): decoded headers, the text of every text part (HTML reduced to text), the URLs
found in text and HTML, and every leaf part with its file name, type and decoded bytes.

The parse is done once per message, in a worker thread, whichever filter asks first
(:func:`view`, memoised on the :class:`~gateway.message.Message`); filters asking at the same
time share it. :func:`parse_bytes` does the same for bytes (``mailgate learn``, tests).

Bounds, so that a huge or hostile message cannot stall the gateway: at most ``MAX_PARSE_BYTES``
of the message are parsed (``truncated`` says when there was more); each text part's decoded
bytes are cut at ``MAX_TEXT_PART_BYTES`` before decoding and HTML reduction; at most
``MAX_PARTS`` leaf parts and ``MAX_URLS`` URLs are kept. Filters apply their own, smaller
scan caps on top (e.g. the rules engine's ``max_scan_bytes``). The structure is bounded by the
message's :class:`~gateway.mimebounds.MimeLimits` (``[limits] max_mime_*``): nesting depth,
entities, header fields per block, encoded words; what they cut is in ``MimeView.limits``
(reported by the ``mime`` filter), so no parse recurses or runs without bound.
"""

from __future__ import annotations

import asyncio
import binascii
import codecs
import email
import email.errors
import email.feedparser
import email.header
import email.message
import email.policy
import email.utils
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING

from gateway import mimebounds
from gateway.filterapi import offload
from gateway.mimebounds import DEFAULT_LIMITS, MimeLimits, Tally

if TYPE_CHECKING:
    from gateway.message import Message

MAX_PARSE_BYTES = 10 * 1024 * 1024
MAX_TEXT_PART_BYTES = 1024 * 1024
MAX_PARTS = 1000
MAX_URLS = 1000
FEED_BLOCK = 64 * 1024  # the spool file is fed to the parser in blocks of this size
_MEMO_KEY = "mime"

_URL = re.compile(r"""(?i)\b(?:(?:https?|ftp)://[^\s<>"'`{}|\\^\[\]]+"""
                  r"""|www\.[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}(?:[/?#][^\s<>"'`{}|\\^\[\]]*)?)""")
_TRAILING = ".,;:!?)]}'\""
_CLEAN_B64 = re.compile(r"[A-Za-z0-9+/\r\n]*((?:=[\r\n]*){0,2})")


@dataclass(frozen=True, slots=True)
class Part:
    """A leaf MIME part."""

    index: int  # depth-first order among the leaf parts
    content_type: str  # lower case, e.g. "application/pdf"
    filename: str | None  # decoded (RFC 2231 / RFC 2047), as the sender named it
    disposition: str | None  # "attachment", "inline" or None
    payload: bytes  # the decoded content (transfer encoding undone)
    declared_type: str = ""  # the Content-Type header's value as sent (for mismatch checks)
    # every name the part's headers give, decoded, each once: each filename= of every
    # Content-Disposition, then each name= of every Content-Type. Mail clients differ on which
    # of repeated parameters or headers wins; the stdlib (``filename``) takes the first
    names: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def is_text(self) -> bool:
        return self.content_type.startswith("text/") and self.disposition != "attachment"


@dataclass(frozen=True, slots=True)
class TextPart:
    content_type: str  # text/plain, text/html, …
    text: str  # decoded; HTML reduced to its visible text
    raw: str  # decoded, HTML kept (SpamAssassin's "rawbody")


@dataclass(frozen=True, slots=True)
class MimeView:
    headers: tuple[tuple[str, str], ...]  # (name, decoded unfolded value), top-level, in order
    raw_headers: tuple[tuple[str, str], ...]  # (name, unfolded value as sent)
    texts: tuple[TextPart, ...]
    urls: tuple[str, ...]  # in order of appearance, duplicates removed
    parts: tuple[Part, ...]  # every leaf part (text ones included)
    truncated: bool = False  # the message was larger than MAX_PARSE_BYTES
    defects: tuple[str, ...] = ()
    subject: str = field(default="")
    # (symbol, detail) for each structural bound met (gateway.mimebounds.findings)
    limits: tuple[tuple[str, str], ...] = ()

    def header_values(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    @property
    def body_text(self) -> str:
        """Every text part's visible text, the Subject first (as SpamAssassin's body rules see
        it)."""
        return "\n".join([self.subject, *(t.text for t in self.texts)])

    @property
    def raw_text(self) -> str:
        return "\n".join(t.raw for t in self.texts)

    @property
    def attachments(self) -> tuple[Part, ...]:
        """Parts that are not the message's text: named, or not text/*, or disposition
        attachment."""
        return tuple(p for p in self.parts if p.filename or not p.is_text)


async def view(message: Message) -> MimeView:
    """The message's MIME view, parsed once (a big message in a worker thread: ``offload``)
    and shared."""
    memo = message.memo
    fut = memo.get(_MEMO_KEY)
    if fut is None:
        fut = asyncio.ensure_future(offload(message.size, parse_message, message))
        memo[_MEMO_KEY] = fut
    result: MimeView = await asyncio.shield(fut)
    return result


def parse_message(message: Message) -> MimeView:
    """The view of a spooled message. At most ``MAX_PARSE_BYTES`` of it are fed to the parser
    block by block, so neither the bytes nor their text are ever held whole (``parse_bytes``
    holds the bytes, a str copy and the stdlib's StringIO of it, 4 bytes a character)."""
    tally = Tally(message.mime_limits)
    parser = mimebounds.parser(tally)
    fallback = not mimebounds.bounds_hold()
    containers = 0
    left, first, skipping = MAX_PARSE_BYTES, True, False
    with message.path.open("rb") as f:
        while left > 0 and (block := f.read(min(FEED_BLOCK, left))):
            left -= len(block)
            if first:
                first, skipping = False, block.startswith(b"From ")
            if skipping:  # an mbox envelope line is not part of the message
                cut = block.find(b"\n")
                if cut < 0:
                    continue
                block, skipping = block[cut + 1:], False
            if fallback:  # the stdlib's parser changed: count containers instead
                containers += mimebounds.containers(block)
                if containers > tally.limits.max_depth:
                    tally.deepest = containers
                    break
            parser.feed(block)
            if tally.stop:  # what follows would be read for nothing: the view is cut here
                break
    return _view(parser.close(), message.size > MAX_PARSE_BYTES, tally)


def parse_bytes(data: bytes, limits: MimeLimits = DEFAULT_LIMITS) -> MimeView:
    """The view of a whole message given as bytes (CRLF or LF; an mbox ``From `` line is
    skipped)."""
    truncated = len(data) > MAX_PARSE_BYTES
    if truncated:
        data = data[:MAX_PARSE_BYTES]
    if data.startswith(b"From "):  # mbox envelope line
        data = data.partition(b"\n")[2]
    tally = Tally(limits)
    parser = mimebounds.parser(tally)
    if not mimebounds.bounds_hold() and mimebounds.containers(data) > limits.max_depth:
        tally.deepest = limits.max_depth + 1
        data = data.partition(b"\n\n" if b"\r\n\r\n" not in data else b"\r\n\r\n")[0]
    for at in range(0, len(data), FEED_BLOCK):
        parser.feed(data[at:at + FEED_BLOCK])
        if tally.stop:
            break
    return _view(parser.close(), truncated, tally)


def _view(msg: email.message.Message, truncated: bool, tally: Tally) -> MimeView:
    raw_headers = tuple((k, _unfold(str(v))) for k, v in msg.items())
    headers = tuple((k, decode_header(v, tally)) for k, v in raw_headers)
    texts: list[TextPart] = []
    parts: list[Part] = []
    urls: dict[str, None] = {}
    defects = [type(d).__name__ for d in msg.defects]
    for leaf in _leaves(msg):
        if len(parts) >= MAX_PARTS:
            defects.append("TooManyParts")
            break
        ctype = leaf.get_content_type().lower()
        try:
            payload = _decoded(leaf)
        except Exception:  # a broken transfer encoding: keep what the part says, raw
            payload = None
        if not isinstance(payload, bytes):
            raw_payload = leaf.get_payload()
            payload = raw_payload.encode("utf-8", "surrogateescape") \
                if isinstance(raw_payload, str) else b""
        filename = _filename(leaf, tally)
        disposition = leaf.get_content_disposition()
        part = Part(len(parts), ctype, filename, disposition, payload,
                    _unfold(str(leaf.get("Content-Type", ""))), _names(leaf, filename, tally))
        parts.append(part)
        defects.extend(type(d).__name__ for d in leaf.defects)
        if part.is_text and (not filename or ctype in ("text/plain", "text/html")):
            raw = _decode_text(payload[:MAX_TEXT_PART_BYTES], leaf.get_content_charset())
            if ctype == "text/html":
                text, links = html_to_text(raw)
                for u in links:
                    _add_url(urls, u)
            else:
                text = raw
            for u in find_urls(text):
                _add_url(urls, u)
            texts.append(TextPart(ctype, text, raw))
    subject = next((v for k, v in headers if k.lower() == "subject"), "")
    return MimeView(headers, raw_headers, tuple(texts), tuple(urls)[:MAX_URLS], tuple(parts),
                    truncated, tuple(defects), subject,
                    (*mimebounds.findings(tally), *_ambiguities(msg)))


def _decoded(leaf: email.message.Message) -> bytes | None:
    """A leaf's content, transfer encoding undone. Base64 made of the alphabet and line breaks
    only (every well-formed part, and one cut by MAX_PARSE_BYTES) is decoded straight from the
    part's text, padded and with the defect noted as the stdlib does: its
    ``get_payload(decode=True)`` first makes a bytes copy, splits it into lines and joins them
    again, three copies of a part that may be megabytes. Anything else goes the stdlib's way."""
    cte = _transfer_encoding(leaf)
    if cte != str(leaf.get("Content-Transfer-Encoding", "")).strip().lower():
        del leaf["Content-Transfer-Encoding"]  # the view's copy only: the stdlib decodes by it
        leaf["Content-Transfer-Encoding"] = cte
    raw = leaf.get_payload()
    if cte == "base64" and isinstance(raw, str) and (m := _CLEAN_B64.fullmatch(raw)):
        pad = -(len(raw) - raw.count("\r") - raw.count("\n")) % 4
        if pad == 0 or (pad < 3 and not m.group(1)):  # as email._encoded_words.decode_b
            if pad:
                leaf.policy.handle_defect(leaf, email.errors.InvalidBase64PaddingDefect())
            return binascii.a2b_base64(raw + "=" * pad if pad else raw)
    payload = leaf.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else None


def _ambiguities(msg: email.message.Message) -> tuple[tuple[str, str], ...]:
    """``("MIME_AMBIGUOUS", detail)`` when an entity's structure reads two ways: several
    Content-Type headers that differ, or a multipart naming several different boundaries.
    The stdlib (and Thunderbird) take the first, other clients the last: what one shows as an
    attachment the other reads as text, so the message cannot be checked as shown."""
    for entity in msg.walk():
        types = entity.get_all("Content-Type") or []
        if len({" ".join(str(t).lower().split()) for t in types}) > 1:
            return (("MIME_AMBIGUOUS", f"{len(types)} different Content-Type headers"),)
        if types and str(types[0]).lower().count("boundary") > 1 \
                and entity.get_content_maintype() == "multipart":
            try:
                found = {str(v) for k, v in entity.get_params() or [] if k.lower() == "boundary"}
            except Exception:  # noqa: BLE001 - parameters the stdlib cannot split
                found = set()
            if len(found) > 1:
                return (("MIME_AMBIGUOUS", f"{len(found)} different boundaries"),)
    return ()


_MECHANISM = re.compile(r'[ \t]*"?[ \t]*([A-Za-z0-9_.+-]+)')
_IDENTITY = frozenset(("7bit", "8bit", "binary", ""))


def _transfer_encoding(leaf: email.message.Message) -> str:
    """The part's transfer encoding as a mail client decodes it: each Content-Transfer-Encoding
    header's first token (``base64 (comment)``, ``base64; x=y``, ``"base64"`` are base64), and
    of several headers the first that is an encoding (clients differ on which header wins; a
    program is found whichever they take)."""
    mechanisms = []
    for value in leaf.get_all("Content-Transfer-Encoding") or ():
        m = _MECHANISM.match(str(value))
        mechanisms.append(m.group(1).lower() if m else "")
    return next((m for m in mechanisms if m not in _IDENTITY),
                mechanisms[0] if mechanisms else "")


def _leaves(msg: email.message.Message) -> Iterator[email.message.Message]:
    for part in msg.walk():
        if not part.is_multipart():
            yield part


def _unfold(value: str) -> str:
    return " ".join(value.split())


def decode_header(value: str, tally: Tally | None = None) -> str:
    """An RFC 2047 header value decoded to text (undecodable words kept as sent). With a
    ``tally``, its ``max_encoded_words`` bound: past it values are kept as sent (the stdlib's
    decoding is superlinear in the number of words: 16,000 in one value take 0.6 s)."""
    if "=?" not in value:
        return value
    if tally is not None and not tally.take_words(value.count("=?")):
        return value
    try:
        return _unfold(str(email.header.make_header(email.header.decode_header(value))))
    except (LookupError, ValueError, email.errors.MessageError):  # HeaderParseError, CharsetError
        return value


def _filename(part: email.message.Message, tally: Tally | None = None) -> str | None:
    """The part's file name: Content-Disposition's ``filename``, else Content-Type's ``name``
    (as ``get_filename`` looks them up). A part whose headers hold neither word has none, and
    its parameters are not parsed (the stdlib parses them in pure Python)."""
    if ("filename" not in str(part.get("Content-Disposition", "")).lower()
            and "name" not in str(part.get("Content-Type", "")).lower()):
        return None
    try:
        name = part.get_filename()
    except Exception:
        return None
    return decode_header(name, tally) if name else None


def _names(part: email.message.Message, filename: str | None,
           tally: Tally | None = None) -> tuple[str, ...]:
    """Every file name the part's headers give (see ``Part.names``), ``filename`` first."""
    out = dict.fromkeys([filename] if filename else [])
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        for value in part.get_all(header) or ():
            if param not in str(value).lower():
                continue
            one = email.message.Message()
            one[header] = str(value)
            try:
                params = one.get_params(header=header) or []
            except Exception:  # noqa: BLE001 - a value the stdlib cannot split: no name in it
                continue
            for key, raw in params:
                if key.lower() != param:
                    continue
                try:
                    name = decode_header(str(email.utils.collapse_rfc2231_value(raw)), tally)
                except Exception:  # noqa: BLE001 - an undecodable RFC 2231 value
                    continue
                if name:
                    out[name] = None
    return tuple(out)


def _decode_text(data: bytes, charset: str | None) -> str:
    cs = (charset or "us-ascii").strip().lower()
    try:
        codecs.lookup(cs)
    except LookupError:
        cs = "latin-1"
    if cs in ("us-ascii", "ascii"):  # undeclared 8-bit text is common: keep it readable
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    return data.decode(cs, "replace")


class _HtmlText(HTMLParser):
    """Visible text of an HTML document (script/style dropped, block tags as line breaks) and
    the URLs of its links, images and forms."""

    _SKIP = {"script", "style", "head", "title", "noscript"}
    _BLOCK = {"p", "br", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table",
              "blockquote", "pre", "hr"}
    _LINK_ATTRS = {"href", "src", "action", "background", "data"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.links: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n")
        for name, value in attrs:
            if name in self._LINK_ATTRS and value:
                self.links.append(value.strip())
            elif name == "alt" and value and not self.skip:
                self.out.append(f" {value} ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self.skip:
            self.skip -= 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)


def html_to_text(markup: str) -> tuple[str, list[str]]:
    """(visible text, link URLs) of an HTML part."""
    p = _HtmlText()
    try:
        p.feed(markup)
        p.close()
    except Exception:  # HTMLParser is lenient; anything else: fall back to stripping tags
        return html.unescape(re.sub(r"<[^>]*>", " ", markup)), []
    text = "".join(p.out)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip(), [u for u in p.links if _URL.match(u) or "://" in u]


def find_urls(text: str) -> list[str]:
    if "://" not in text and "www." not in text.lower():  # what every _URL match holds; two
        return []  # substring tests cost a tenth of the regex's pass over a text with no URL
    return [m.group(0).rstrip(_TRAILING) for m in _URL.finditer(text)]


def _add_url(urls: dict[str, None], url: str) -> None:
    if len(urls) < MAX_URLS:
        urls.setdefault(url.strip(), None)


def url_host(url: str) -> str | None:
    """The host of a URL (lower case, no port, no credentials, no trailing dot), or None."""
    m = re.match(r"(?i)^(?:[a-z][a-z0-9+.-]*://)?(?:[^@/?#]*@)?(\[[^\]]*\]|[^:/?#]+)", url)
    if not m:
        return None
    host = m.group(1).strip("[]").rstrip(".").lower()
    return host or None
