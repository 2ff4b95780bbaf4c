"""Structural bounds for the MIME parse: how deep containers nest, how many entities a
message has, how many header fields one header block holds, how many RFC 2047 encoded words
are decoded. A hostile message (2000 nested multiparts, a million empty parts, a header of
70,000 encoded words) gets a *finding* from these bounds, never a ``RecursionError`` or a
parse that runs for minutes.

The stdlib's feed parser recurses once per nesting level (a generator per level, and the
boundary regexes compiled inside it), so 2000 levels end in ``RecursionError``. It is bounded
here through its public extension points only: the message factory (``FeedParser(_factory=)``)
makes :class:`BoundedMessage` objects, which

* learn their depth when the parser attaches them to their parent (``attach``, called when a
  sub-part starts, before its headers are read);
* answer ``application/octet-stream`` from ``get_content_type`` when they are a container
  (``multipart/*``, ``message/*``) nested deeper than ``max_depth``: the parser then reads the
  rest of that entity as one opaque leaf instead of recursing into it;
* keep no entity beyond ``max_parts``, and no header field beyond ``max_headers`` in one
  header block (``set_raw``); the parse is then fed no more (``Tally.stop``), so time and
  memory stay bounded too.

What was cut is recorded in a shared :class:`Tally`; :func:`findings` turns it into
(symbol, detail) pairs, e.g. ``("MIME_TOO_DEEP", "more than 50 levels")``.

That the stdlib still calls these hooks as assumed is checked once per process, at import
(patch ``email.feedparser-bounds``, gateway/patches.py), on a built message 8 levels deep
parsed with a bound of 3: should a new Python parse it differently, the parse of each message
stops before deeper input than the bound could nest (counting ``Content-Type: multipart`` /
``message`` lines), the patch registry logs its one warning, and the finding is still
reported.
"""

from __future__ import annotations

import email.feedparser
import email.message
import email.policy
import re
from dataclasses import dataclass
from typing import Any

from gateway import obsheaders, patches

HARD_MAX_DEPTH = 200  # the largest max_depth a policy may set (the stdlib recurses per level)
OPAQUE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class MimeLimits:
    """The bounds of one parse (``[limits] max_mime_*`` in the policy)."""

    max_depth: int = 50  # nested containers (multipart/*, message/*), the top level counted
    max_parts: int = 1000  # MIME entities, containers and leaves, the message itself counted
    max_headers: int = 1000  # header fields in one header block (the top one or a part's)
    max_encoded_words: int = 1000  # RFC 2047 encoded words decoded in the whole message


DEFAULT_LIMITS = MimeLimits()


@dataclass(slots=True)
class Tally:
    """What one parse met and cut, shared by every entity of the message."""

    limits: MimeLimits
    parts: int = 1  # the message itself; each sub-part counts when attached to its parent
    deepest: int = 0  # the deepest container level that was *not* opened (0: none cut)
    parts_cut: bool = False
    headers_cut: bool = False
    words: int = 0
    words_cut: bool = False

    @property
    def stop(self) -> bool:
        """Whether reading on is pointless: entities or header fields are no longer kept (a
        million empty parts took the stdlib 12 s to read; nothing after the bound is used)."""
        return self.parts_cut or self.headers_cut

    def take_words(self, n: int) -> bool:
        """Room for ``n`` more encoded words? (Counted either way; False once over.)"""
        self.words += n
        if self.words > self.limits.max_encoded_words:
            self.words_cut = True
            return False
        return True


class BoundedMessage(email.message.Message):
    """A compat32 message that knows its nesting depth and enforces the tally's bounds."""

    _depth = 1
    _tally: Tally | None = None
    _headers_seen = 0

    def attach(self, payload: Any) -> None:
        tally = self._tally
        if isinstance(payload, BoundedMessage):
            payload._depth = self._depth + 1
            if tally is not None:
                tally.parts += 1
                if tally.parts > tally.limits.max_parts:
                    tally.parts_cut = True
                    return  # read by the parser (up to the end of this block), kept by nobody
        super().attach(payload)

    def set_raw(self, name: str, value: Any) -> None:
        tally = self._tally
        if tally is not None:
            self._headers_seen += 1
            if self._headers_seen > tally.limits.max_headers:
                tally.headers_cut = True
                return
        super().set_raw(name, value)

    def get_content_type(self) -> str:
        ctype: str = super().get_content_type()
        tally = self._tally
        if tally is not None and self._depth > tally.limits.max_depth \
                and ctype.startswith(("multipart/", "message/")):
            tally.deepest = max(tally.deepest, self._depth)
            return OPAQUE
        return ctype


def parser(tally: Tally) -> email.feedparser.BytesFeedParser:
    """A compat32 feed parser whose every entity is a :class:`BoundedMessage` on ``tally``;
    it reads the obsolete ``Name WSP :`` header syntax (gateway/obsheaders.py)."""

    def factory(policy: Any = obsheaders.POLICY) -> BoundedMessage:
        msg = BoundedMessage(policy)
        msg._tally = tally  # (the parser also makes one at its start, to try the factory)
        return msg

    return obsheaders.ObsBytesFeedParser(_factory=factory, policy=obsheaders.POLICY)


def findings(tally: Tally) -> tuple[tuple[str, str], ...]:
    """(symbol, detail) for every bound the parse met."""
    lim = tally.limits
    out = []
    if tally.deepest:
        out.append(("MIME_TOO_DEEP", f"more than {lim.max_depth} levels"))
    if tally.parts_cut:
        out.append(("MIME_TOO_MANY_PARTS", f"more than {lim.max_parts} parts"))
    if tally.headers_cut:
        out.append(("MIME_TOO_MANY_HEADERS", f"more than {lim.max_headers} in a header block"))
    if tally.words_cut:
        out.append(("MIME_TOO_MANY_ENCODED_WORDS", f"more than {lim.max_encoded_words}"))
    return tuple(out)


# --- the start-up proof, and the fallback should it fail ---------------------------------

def nested(levels: int, inner: bytes = b"Content-Type: text/plain\r\n\r\nhello\r\n") -> bytes:
    """A message of ``levels`` nested multipart/mixed containers around ``inner``."""
    head = b"From: a@example.test\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                       for i in range(levels))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(levels)))
    return head + opening + inner + closing


def check_bounds() -> str | None:
    """None when the stdlib's parser honours the hooks as assumed, else what differs."""
    tally = Tally(MimeLimits(max_depth=3))
    p = parser(tally)
    p.feed(nested(8))
    msg = p.close()
    depth, node = 1, msg
    while node.is_multipart():
        child = node.get_payload(0)
        assert isinstance(child, email.message.Message)
        node, depth = child, depth + 1
    if not isinstance(node, BoundedMessage):
        return "the parser does not make its parts with the message factory"
    if (depth, tally.deepest) != (4, 4) or node.get_content_type() != OPAQUE:
        return f"8 levels with a bound of 3 parsed {depth} deep (deepest cut {tally.deepest})"
    if b"--b7--" not in (node.get_payload(decode=True) or b""):
        return "the level past the bound did not keep the deeper content"
    return None


_proven = patches.install("email.feedparser-bounds", check_bounds)


def bounds_hold() -> bool:
    """Whether the stdlib's parser calls the hooks as this module assumes (checked once)."""
    return _proven


_CONTAINER = re.compile(rb"(?im)^content-type:[ \t]*(?:multipart|message)/")


def containers(data: bytes) -> int:
    """The fallback's measure: container Content-Type lines in ``data``. More of them than
    ``max_depth`` may nest too deep (an over-estimate, siblings count too: used only when the
    proof failed), and the parse stops before them."""
    return len(_CONTAINER.findall(data))
