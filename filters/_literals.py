"""Literal prefilter for content rules: the strings one of which every match must contain.

A rule's regex is searched over the whole body (or raw body, URL list, raw message) of every
message, and most rules miss on most messages. Before the regex runs, a cheap substring test
(``str.__contains__``) for the literals the pattern requires rules most of them out, as
SpamAssassin's base-string extraction and Rspamd's multipattern prefilters do.

:func:`needle` reads the pattern with the same parser the rule file's checks use (Python's
``re`` syntax is the rule files' contract: see :mod:`filters._rulefile`) and walks it: a run of
literal characters is a required string; a group, an atomic group or a repeat of at least one
contributes what its body requires; an alternation requires one string from each branch (so one
of their union); anything else (classes, ``.``, anchors, lookarounds, back-references) requires
nothing. Of everything a sequence requires, the needle keeps the set whose shortest string is
longest. A pattern it cannot read, or whose flags it does not know, gets no needle: the regex
always runs.

Case-insensitive patterns keep only ASCII literals and are tested against :func:`fold` of the
text. ``regex`` matches an ASCII letter, ignoring case, against exactly four characters beyond
ASCII (``İ ı ſ K``); :func:`fold` maps each of them, and each ASCII letter, to one lower-case
ASCII letter, so the span a match covers folds to the folded literal.
tests/filters/test_rule_literals.py checks this claim against ``regex`` for every cased code
point.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import regex

_sre: Any = importlib.import_module("re._parser")
_KNOWN_FLAGS = int(re.I | re.M | re.S | re.X | re.U)
_V0 = int(regex.V0)  # regex's default (re-compatible) behaviour, set in every compiled .flags
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)
_DOTTED = {0x130: "i", 0x131: "i"}  # İ ı: casefold() makes İ two characters and keeps ı
_MAX_LEN = 64  # longer literals add nothing to the test


@dataclass(frozen=True)
class Needle:
    """At least one of ``strings`` is in every text the pattern matches (after :func:`fold`
    when ``folded``)."""
    strings: tuple[str, ...]
    folded: bool

    def in_text(self, text: str) -> bool:
        return any(s in text for s in self.strings)


def fold(text: str) -> str:
    """The text a case-insensitive needle is tested against."""
    if not text.isascii() and ("\u0130" in text or "\u0131" in text):
        text = text.translate(_DOTTED)
    return text.casefold()


def needle(pattern: str, flags: int) -> Needle | None:
    """The needle of a ``regex``/``re`` pattern compiled with ``flags``; None when the
    pattern requires no literal that this reading can prove."""
    flags = int(flags) & ~_V0
    if flags & ~_KNOWN_FLAGS:
        return None
    try:
        parsed = _sre.parse(pattern, flags)
    except (re.error, RecursionError, OverflowError):
        return None
    flags |= int(parsed.state.flags)
    if flags & ~_KNOWN_FLAGS:
        return None
    folded = bool(flags & re.I)
    found = _required(list(parsed), folded)
    if not found or not all(found):
        return None
    strings = tuple(sorted(s.casefold() if folded else s for s in found))
    return Needle(strings, folded)


def _required(items: list[tuple[Any, Any]], folded: bool) -> frozenset[str] | None:
    """One of the returned strings is in every match of the sequence; None: nothing known."""
    options: list[frozenset[str]] = []
    run: list[str] = []

    def end_run() -> None:
        if run:
            options.append(frozenset(["".join(run)[:_MAX_LEN]]))
            run.clear()

    for op, av in items:
        if op is _sre.LITERAL and (av < 0x80 or not folded):
            run.append(chr(av))
            continue
        if op in _REPEATS and av[0] >= 1 and len(av[2]) == 1 and av[2][0][0] is _sre.LITERAL \
                and (av[2][0][1] < 0x80 or not folded):
            run.append(chr(av[2][0][1]) * min(av[0], _MAX_LEN))  # x{3,}: "xxx"
            if av[1] != av[0]:
                end_run()
            continue
        end_run()
        sub: frozenset[str] | None = None
        if op is _sre.SUBPATTERN:
            _group, add, remove, body = av
            if not add and not remove:
                sub = _required(list(body), folded)
        elif op is _sre.ATOMIC_GROUP:
            sub = _required(list(av), folded)
        elif op in _REPEATS and av[0] >= 1:
            sub = _required(list(av[2]), folded)
        elif op is _sre.BRANCH:
            branches = [_required(list(b), folded) for b in av[1]]
            if all(b is not None for b in branches):
                sub = frozenset().union(*[b for b in branches if b is not None])
        if sub:
            options.append(sub)
    end_run()
    if not options:
        return None
    return max(options, key=lambda o: (min(map(len, o)), -len(o)))
