"""Authentication-Results (RFC 8601) and ARC-Authentication-Results (RFC 8617 §4.1.1) values
read by the ``authres`` library's own grammar, never by hand: the authserv-id, the version,
each result (an ``authres`` result object) and each result clause's text as written (comments
kept, whitespace collapsed), taken from the spans the library's parser consumed.

Fail closed. A value the library cannot parse (a syntax error, an unsupported version, any
other exception), a value longer than :data:`MAX_VALUE` characters or with comments nested
deeper than :data:`MAX_NESTING` (the library recurses once per level) is *unparsable*:
:func:`parse` returns None. The caller then decides with :func:`mentions` whether the value
names our authserv-id anywhere (a case-insensitive token search of the raw value, comments
and quoted strings included); the ``authres`` filter removes such a header.

The library's quirks are kept, not fixed, so that what is read here is what the library reads:
its CFWS rule stops at white space that follows a comment after white space, so a value that
starts ``(a) (b) id;`` is unparsable (and removed when ``id`` is ours). Values are unfolded and
stripped first, as dkimpy hands them to the library.

The clause spans and the ``i=`` prefix come from overriding the library's private parser steps
(``_parse``, ``_parse_resinfo``, ``_parse_pattern``, ``_parse_rfc5322_cfws``, ``_parse_text``):
patch ``authres.clause-spans`` (gateway/patches.py) checks them once, at import, against the
library's own reading of known values. When it is off, :func:`parse` uses the library's own
class and gives each clause as the library renders it (comments dropped, as dkimpy's own AAR),
and :func:`parse_aar` answers None (unparsable: no ARC override of DMARC).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import authres
import authres.core

from gateway import patches

PATCH = "authres.clause-spans"
MAX_VALUE = 4096  # characters: longer values are not parsed (the parser is quadratic: ~12 ms)
MAX_NESTING = 50  # comment depth: deeper values are not parsed (the parser recurses)
_FEATURES = authres.all_features()  # arc, dmarc, ... result classes; unknown methods parse too
_TOKEN_CHARS = "A-Za-z0-9_-"
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True, slots=True)
class Parsed:
    """One header value as the ``authres`` library reads it."""

    authserv_id: str  # lower case, as the library gives it
    version: str | None
    results: tuple[Any, ...]  # authres result objects (``.method``, ``.result``, ...)
    texts: tuple[str, ...]  # each result clause as written, comments kept
    instance: int | None = None  # ARC-Authentication-Results only: its i=


class _Header(authres.core.AuthenticationResultsHeader):
    """The library's header parser, noting where each result clause starts and ends."""

    _parse_text: str
    _full: str
    _spans: list[tuple[int, int]]

    def _parse(self) -> None:
        self._full = self._parse_text
        self._spans = []
        super()._parse()

    def _parse_resinfo(self) -> Any:
        start = len(self._full) - len(self._parse_text)
        result = super()._parse_resinfo()
        if result and result is not self.NONE_RESULT:
            self._spans.append((start, len(self._full) - len(self._parse_text)))
        return result

    def texts(self) -> tuple[str, ...]:
        out = []
        for (start, end), result in zip(self._spans, self.results, strict=True):
            text = self._full[start:end].strip()
            # a clause starts at its ';' (the previous clause took the CFWS before it)
            out.append(" ".join(text[1:].split()) if text.startswith(";") else str(result))
        return tuple(out)


class _AarHeader(_Header):
    """ARC-Authentication-Results: ``[CFWS] "i" [CFWS] "=" [CFWS] 1*DIGIT [CFWS] ";"`` and
    then an Authentication-Results payload (RFC 8617 §4.1.1), with the library's grammar."""

    instance: int

    def _parse(self) -> None:
        self._cfws()
        if not self._parse_pattern(r"i"):
            raise authres.core.SyntaxError("Expected i=", self._parse_text)
        self._cfws()
        if not self._parse_pattern(r"="):
            raise authres.core.SyntaxError('Expected "="', self._parse_text)
        self._cfws()
        digits = self._parse_pattern(r"[0-9]{1,5}(?![0-9])")
        if not digits:
            raise authres.core.SyntaxError("Expected instance", self._parse_text)
        self.instance = int(digits.group())
        self._cfws()
        if not self._parse_pattern(r";"):
            raise authres.core.SyntaxError('Expected ";"', self._parse_text)
        # the payload exactly as parse() reads an Authentication-Results value (stripped)
        self._parse_text = self._parse_text.strip(" \t\r\n")
        super()._parse()

    def _cfws(self) -> None:
        """All CFWS (the library's one call stops at FWS after a comment)."""
        while self._parse_rfc5322_cfws():
            pass


def parse(value: str) -> Parsed | None:
    """An Authentication-Results value (folded or not) as the library reads it, or None when
    it is unparsable (see the module docstring)."""
    if not active():
        own = _run(authres.core.AuthenticationResultsHeader, value)
        if own is None:
            return None
        results = tuple(own.results)
        return Parsed(own.authserv_id, own.version, results, tuple(str(r) for r in results))
    header = _run(_Header, value)
    if header is None:
        return None
    assert isinstance(header, _Header)
    return Parsed(header.authserv_id, header.version, tuple(header.results), header.texts())


def parse_aar(value: str) -> Parsed | None:
    """An ARC-Authentication-Results value as the library reads it (with its ``i=``), or None
    when it is unparsable (always, when patch ``authres.clause-spans`` is off)."""
    if not active():
        return None
    header = _run(_AarHeader, value)
    if header is None:
        return None
    assert isinstance(header, _AarHeader)
    return Parsed(header.authserv_id, header.version, tuple(header.results), header.texts(),
                  header.instance)


def mentions(value: str, authserv_id: str) -> bool:
    """Whether ``authserv_id`` occurs in ``value`` as a token (not inside a longer name such
    as ``mx.example.evil`` or ``xmx.example``), in any case, comments and quotes included."""
    pattern = (rf"(?<![{_TOKEN_CHARS}]){re.escape(authserv_id)}(?![{_TOKEN_CHARS}])"
               rf"(?!\.[{_TOKEN_CHARS}])")
    return re.search(pattern, value, re.IGNORECASE) is not None


def _run(cls: type[authres.core.AuthenticationResultsHeader], value: str
         ) -> authres.core.AuthenticationResultsHeader | None:
    text = _UNFOLD.sub("", value).strip(" \t\r\n")  # as dkimpy hands values to the library
    if len(text) > MAX_VALUE or _nesting(text) > MAX_NESTING:
        return None
    try:
        header = cls.parse_value(_FEATURES, text)
    except Exception:  # noqa: BLE001 - any failure of the library: unparsable, fail closed
        return None
    assert isinstance(header, cls)
    return header


def _nesting(text: str) -> int:
    """An upper bound of the comment nesting depth (parentheses counted wherever they are)."""
    depth = deepest = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth = max(depth - 1, 0)
    return deepest


_KNOWN = "mx.example (ours); spf=pass (sender ok) smtp.mailfrom=a.example; dkim=fail header.d=b.example"
_KNOWN_TEXTS = ("spf=pass (sender ok) smtp.mailfrom=a.example", "dkim=fail header.d=b.example")


def check() -> str | None:
    """None when the private steps the subclasses override are there and read known values as
    the library does; else the reason."""
    lib = authres.core.AuthenticationResultsHeader
    for name in ("_parse", "_parse_resinfo", "_parse_pattern", "_parse_rfc5322_cfws"):
        if not callable(getattr(lib, name, None)):
            return f"AuthenticationResultsHeader.{name} is missing"
    if not patches.calls(lib._parse, "_parse_resinfo"):
        return "AuthenticationResultsHeader._parse no longer calls _parse_resinfo"
    header = _run(_Header, _KNOWN)
    own = _run(lib, _KNOWN)
    if not isinstance(header, _Header) or own is None:
        return "a known value is unparsable"
    if (header.authserv_id, [str(r) for r in header.results]) != \
            (own.authserv_id, [str(r) for r in own.results]):
        return "a known value reads otherwise than with the library's own class"
    if header.texts() != _KNOWN_TEXTS:
        return f"a known value's clauses are {header.texts()!r}"
    aar = _run(_AarHeader, f"i=2; {_KNOWN}")
    if not isinstance(aar, _AarHeader) or aar.instance != 2 or aar.texts() != _KNOWN_TEXTS:
        return "a known ARC-Authentication-Results value reads otherwise"
    return None


def active() -> bool:
    """Whether patch ``authres.clause-spans`` is in use."""
    return patches.active(PATCH)


patches.install(PATCH, check)
