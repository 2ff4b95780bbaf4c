"""The Bayes tokenizer: the set of tokens (features) of one message, from its parsed MIME view,
and the message's signature (so learning a message twice does not count it twice).

What becomes a token (all lower case; a message yields each token at most once):

* body words: the visible text of every text part (HTML reduced to text by gateway.mime), words
  of 3 to 12 characters with surrounding punctuation stripped, numbers included; a longer word
  becomes ``skip:C N`` (its first character and its length rounded down to tens, as SpamBayes
  does), an e-mail address in the text ``email name:LOCAL`` and ``email addr:DOMAIN``; the
  share of non-ASCII characters as ``8bit%:N``;
* headers, prefixed by the field name: ``subject:WORD``; ``from:addr:ADDR``,
  ``from:domain:DOMAIN``, ``from:name:WORD`` (also ``reply-to``, ``sender``), ``to:domain:…``
  and ``cc:domain:…`` plus a recipient-count bucket; ``x-mailer:…``, ``user-agent:…``,
  ``content-type:…``, ``charset:…``, ``message-id:@DOMAIN``; the presence of every other field
  as ``header:NAME``;
* URLs: ``proto:SCHEME``, ``url:HOST``, ``url:DOMAIN`` (last two labels) and ``url:PIECE`` for
  the first pieces of the path;
* parts: ``ctype:TYPE`` of every leaf part and ``filename:.EXT`` of named ones.

Headers added on the way in — by us (``X-Spam-*``, ``Authentication-Results``, our own
``Received`` (``by`` one of ``own_hosts``: the gateway's hostname), ``Received-SPF``, ARC and
DKIM fields) or by the delivering server (``Return-Path``, ``Delivered-To``,
``X-Original-To``) — are not tokenized: learning happens on messages as stored, with those
headers on them, while classification sees them without. The other ``Received`` headers are
mined as SpamBayes does: ``received:`` host-name suffixes and IP prefixes (where mail comes
from is one of the strongest clues).

Bounds: at most ``max_text_chars`` of body text and ``max_tokens`` tokens per message.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.headeraddr import addresses
from gateway.mime import MimeView, url_host

DEFAULT_SKIP_HEADERS = (
    "received-spf", "authentication-results", "arc-*", "dkim-signature",
    "domainkey-signature", "x-spam-*", "return-path", "delivered-to", "x-original-to",
)
_STRIP = "\"'.,;:!?()[]{}<>*_=+|`~^-#/\\"
_URL_PIECE = re.compile(r"[/?=&.,;:_~%+#-]+")
_ADDR_FIELDS = frozenset({"from", "reply-to", "sender"})
_RCPT_FIELDS = frozenset({"to", "cc"})
_VALUE_FIELDS = frozenset({"x-mailer", "user-agent", "content-transfer-encoding"})
_MIN_WORD, _MAX_WORD = 3, 12


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    max_text_chars: int = 100_000
    max_tokens: int = 5_000
    max_urls: int = 100
    skip_headers: tuple[str, ...] = DEFAULT_SKIP_HEADERS  # names; "prefix*" for a prefix
    own_hosts: tuple[str, ...] = ()  # our host names: a Received "by" one of them is ours

    def own_received(self, value: str) -> bool:
        m = re.search(r"\bby\s+([^\s;()]+)", value, re.I)
        return m is not None and m.group(1).lower().rstrip(".") in self.own_hosts

    def skips(self, name: str) -> bool:
        n = name.lower()
        exact, prefixes = _skip_sets(self.skip_headers)
        return n in exact or n.startswith(prefixes)


@functools.lru_cache(maxsize=16)
def _skip_sets(skip: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    return (frozenset(s for s in skip if not s.endswith("*")),
            tuple(s[:-1] for s in skip if s.endswith("*")))


class _Bag:
    """A capped set of tokens."""

    def __init__(self, cap: int) -> None:
        self.tokens: set[str] = set()
        self.cap = cap

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.cap

    def add(self, token: str) -> None:
        if len(self.tokens) < self.cap:
            self.tokens.add(token)


def tokenize(view: MimeView, cfg: TokenizerConfig = TokenizerConfig()) -> frozenset[str]:
    """The tokens of a message."""
    bag = _Bag(cfg.max_tokens)
    _headers(view, cfg, bag)
    _parts(view, bag)
    _urls(view.urls[:cfg.max_urls], bag)
    budget = cfg.max_text_chars
    for part in view.texts:
        if budget <= 0 or bag.full:
            break
        text = part.text[:budget]
        budget -= len(text)
        _words(text, "", bag)
        if text:
            high = len(text) - len(text.encode("ascii", "ignore"))
            if high:
                bag.add(f"8bit%:{round(100 * high / len(text), -1):.0f}")
    return frozenset(bag.tokens)


def _words(text: str, prefix: str, bag: _Bag) -> None:
    tokens, cap = bag.tokens, bag.cap
    # Each distinct word once, in the order of first use (``dict.fromkeys``): a repeat can add
    # no token its first use did not, so the tokens, and which ones a full bag keeps, are
    # the same; hashing a word costs a fraction of the loop's turn.
    for w in dict.fromkeys(text.lower().split()):
        if len(tokens) >= cap:
            return
        w = w.strip(_STRIP)
        n = len(w)
        if n < _MIN_WORD:
            continue
        if n <= _MAX_WORD:
            tokens.add(prefix + w)
        elif "@" in w and "://" not in w:
            name, _, domain = w.rpartition("@")
            bag.add(f"{prefix}email name:{name[:40]}")
            for label in domain.split(".")[-3:]:
                if label:
                    bag.add(f"{prefix}email addr:{label[:40]}")
        elif w.startswith(("http:", "https:", "www.", "ftp:")):
            continue  # URLs are tokenized from view.urls
        else:
            bag.add(f"{prefix}skip:{w[0]} {n // 10 * 10}")


def _headers(view: MimeView, cfg: TokenizerConfig, bag: _Bag) -> None:
    for name, value in view.headers:
        ln = name.lower()
        if cfg.skips(ln) or (ln == "received" and cfg.own_received(value)):
            continue
        bag.add(f"header:{ln[:40]}")
        if ln == "received":
            _received(value, bag)
        elif ln == "subject":
            _words(value, "subject:", bag)
        elif ln in _ADDR_FIELDS or ln in _RCPT_FIELDS:
            _addresses(ln, value, bag)
        elif ln in _VALUE_FIELDS:
            bag.add(f"{ln}:{' '.join(value.lower().split())[:40]}")
        elif ln == "content-type":
            main, _, params = value.lower().partition(";")
            bag.add(f"content-type:{main.strip()[:40]}")
            m = re.search(r'charset\s*=\s*"?([\w.:-]+)', params)
            if m:
                bag.add(f"charset:{m.group(1)[:30]}")
        elif ln == "message-id":
            m = re.search(r"@([^>\s]+)>?\s*$", value)
            bag.add(f"message-id:@{m.group(1).lower()[:60]}" if m else "message-id:invalid")


_RCVD_HOST = re.compile(r"\b(?:from|by)\s+([a-z0-9][a-z0-9.-]*\.[a-z]{2,})", re.I)
_RCVD_IP = re.compile(r"[\[(]((?:\d{1,3}\.){3}\d{1,3})[\])]")


def _received(value: str, bag: _Bag) -> None:
    """SpamBayes-style: the host names (each domain suffix) and the bracketed IP addresses
    (and their /8, /16, /24 prefixes) a Received header names — where mail comes from is one
    of the strongest clues. Our own hop's header (present only in mail learned as stored) is
    the same on spam and ham, so its tokens stay neutral."""
    for m in _RCVD_HOST.finditer(value[:500]):
        labels = m.group(1).lower().rstrip(".").split(".")
        for i in range(max(0, len(labels) - 4), len(labels) - 1):
            bag.add(f"received:{'.'.join(labels[i:])[:80]}")
    for m in _RCVD_IP.finditer(value[:500]):
        octets = m.group(1).split(".")
        for n in (1, 2, 3, 4):
            bag.add(f"received:{'.'.join(octets[:n])}")


def _addresses(field: str, value: str, bag: _Bag) -> None:
    pairs = addresses(value)[:50]
    if field in _RCPT_FIELDS:
        bag.add(f"{field}:count:{min(len(pairs), 10)}")
    for realname, addr in pairs:
        addr = addr.lower()
        domain = addr.rpartition("@")[2] if "@" in addr else ""
        if domain:
            bag.add(f"{field}:domain:{domain[:60]}")
        if field in _ADDR_FIELDS:
            if addr:
                bag.add(f"{field}:addr:{addr[:80]}")
            if realname:
                _words(realname, f"{field}:name:", bag)
            else:
                bag.add(f"{field}:no real name")


def _parts(view: MimeView, bag: _Bag) -> None:
    for p in view.parts[:50]:
        bag.add(f"ctype:{p.content_type[:40]}")
        if p.filename:
            ext = p.filename.rpartition(".")[2].lower() if "." in p.filename else ""
            bag.add(f"filename:.{ext[:10]}")


def _urls(urls: Iterable[str], bag: _Bag) -> None:
    for url in urls:
        if bag.full:
            return
        scheme = url.partition("://")[0].lower() if "://" in url else "http"
        bag.add(f"proto:{scheme[:10]}")
        host = url_host(url)
        if not host:
            continue
        bag.add(f"url:{host[:80]}")
        labels = host.split(".")
        if len(labels) > 2:
            bag.add(f"url:{'.'.join(labels[-2:])}")
        rest = url.split("://", 1)[-1]
        path = rest[rest.find("/"):] if "/" in rest else ""
        pieces = [p for p in _URL_PIECE.split(path.lower()) if 3 <= len(p) <= 20]
        for piece in pieces[:8]:
            bag.add(f"url:{piece}")


def token_id(token: str) -> int:
    """A token as a signed 64-bit integer (the store keeps hashes, not strings): the first 8
    bytes of its UTF-8 BLAKE2b-64 digest, big-endian. Stored in every token database: never
    change it."""
    return token_ids((token,))[0]


def token_ids(tokens: Iterable[str]) -> tuple[int, ...]:
    """``token_id`` of each token, the call inlined (a 64 KiB message has ~3,600 tokens). Each
    hash starts as a copy of an empty BLAKE2b-64 state: ~365 ns a token, against ~485 for
    ``blake2b(data, digest_size=8)``, whose keyword parsing and parameter block cost more
    than the hashing. (The empty state is never updated, so threads may copy it at once.)"""
    copy = _EMPTY.copy
    out: list[int] = []
    append = out.append
    for t in tokens:
        h = copy()
        h.update(t.encode("utf-8", "surrogatepass"))
        append(_INT64(h.digest())[0])
    return tuple(out)


_EMPTY = hashlib.blake2b(digest_size=8)
_INT64 = struct.Struct(">q").unpack


def message_key(raw: bytes) -> str:
    """The signature that identifies a message for learning: a hash of its Message-ID and its
    body (line ends normalised, trailing white space dropped), so the same message stored
    with other headers on top (ours, the delivering server's) is still the same message."""
    data = raw.replace(b"\r\n", b"\n")
    if data.startswith(b"From "):
        data = data.partition(b"\n")[2]
    head, _, body = data.partition(b"\n\n")
    m = re.search(rb"(?im)^message-id:[ \t]*(.*(?:\n[ \t].*)*)", head)
    msgid = b" ".join(m.group(1).split()) if m else b""
    h = hashlib.sha256(msgid + b"\0" + b"\n".join(line.rstrip() for line in
                                                  body.rstrip().split(b"\n")))
    return h.hexdigest()[:40]
