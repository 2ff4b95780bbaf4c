r"""Literal prefilter for content rules: the literals every match of a pattern must contain.

A rule's regex is searched over the whole body (or raw body, URL list, raw message) of every
message, and most rules miss on most messages. Before the regex runs, a cheap substring test
(``str.__contains__``) for the literals the pattern requires rules most of them out, as
SpamAssassin's base-string extraction and Rspamd's multipattern prefilters do.

:func:`needle` reads the pattern with the same parser the rule file's checks use (Python's
``re`` syntax is the rule files' contract: see :mod:`filters._rulefile`) and walks it: a run of
literal characters is a required string; a group, an atomic group or a repeat of at least one
contributes what its body requires; an alternation requires what one of its branches requires;
anything else (classes, ``.``, anchors, lookarounds, back-references) requires nothing. A
sequence requires all that its parts require: the needle is an OR of ANDs of
strings (``/next\s+of\s+kin|nigeria/i``: ``next`` and ``kin``, or ``nigeria``), the ANDs
multiplied out up to ``_MAX_TERMS`` alternatives (past that, the weaker parts are left out,
which only makes the test pass more often). A pattern it cannot read, or whose flags it does
not know, gets no needle: the regex always runs.

Case-insensitive patterns keep only ASCII literals and are tested against :func:`fold` of the
text. ``regex`` matches an ASCII letter, ignoring case, against exactly four characters beyond
ASCII (``İ ı ſ K``); :func:`fold` maps each of them, and each ASCII letter, to one lower-case
ASCII letter, so the span a match covers folds to the folded literal.
tests/filters/test_rule_literals.py checks this claim against ``regex`` for every cased code
point.

The parser is CPython's private ``re._parser`` (formerly ``sre_parse``): before first use the
needles and splits of known patterns are compared with known answers (patch
``re._parser.literals``, gateway/patches.py). When the module, a symbol or an answer differs,
no pattern gets a needle or a split (every regex runs on every text: the same hits, slower),
with one warning line.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import regex

from gateway import patches

try:
    _sre: Any = importlib.import_module("re._parser")
    _REPEATS: tuple[Any, ...] = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)
except (ImportError, AttributeError):  # checked below
    _sre, _REPEATS = None, ()
_KNOWN_FLAGS = int(re.I | re.M | re.S | re.X | re.U)
_V0 = int(regex.V0)  # regex's default (re-compatible) behaviour, set in every compiled .flags
_DOTTED = {0x130: "i", 0x131: "i"}  # İ ı: casefold() makes İ two characters and keeps ı
_MAX_LEN = 64  # longer literals add nothing to the test
_MAX_TERMS = 32  # alternatives (ANDs) in one needle at most

Dnf = frozenset[frozenset[str]]  # an OR of ANDs of strings


@dataclass(frozen=True)
class Needle:
    """Every text the pattern matches (after :func:`fold` when ``folded``) holds all the
    strings of at least one of ``terms``."""
    terms: tuple[tuple[str, ...], ...]
    folded: bool

    def in_text(self, text: str, memo: dict[str, bool] | None = None,
                within: Mapping[str, tuple[str, ...]] | None = None) -> bool:
        """Whether ``text`` may match. ``memo``: substring answers for this text, shared by
        the needles tested against it (their strings repeat). ``within`` (:func:`containments`):
        the other needle strings each string contains; one of those known absent from the
        text makes the string absent without a search."""
        if memo is None:
            memo = {}
        for term in self.terms:
            for s in term:
                found = memo.get(s)
                if found is None:
                    parts = within.get(s) if within else None
                    if parts and any(memo.get(t) is False for t in parts):
                        found = memo[s] = False
                    else:
                        found = memo[s] = s in text
                if not found:
                    break
            else:
                return True
        return False


def containments(needles: Iterable[Needle | None]) -> dict[str, tuple[str, ...]]:
    """For each string of ``needles``, the others it contains (only strings that contain one):
    a text without ``free`` has no `` free`` and no ``free gift``. Containment holds for any
    text, folded or not, so one table serves every memo of :meth:`Needle.in_text`."""
    strings = sorted({s for n in needles if n is not None for term in n.terms for s in term},
                     key=lambda s: (len(s), s))
    out: dict[str, tuple[str, ...]] = {}
    for i, s in enumerate(strings):
        parts = tuple(t for t in strings[:i] if t in s)  # the shorter ones: sorted by length
        if parts:
            out[s] = parts
    return out


def fold(text: str) -> str:
    """The text a case-insensitive needle is tested against."""
    if not text.isascii() and ("\u0130" in text or "\u0131" in text):
        text = text.translate(_DOTTED)
    return text.casefold()


def needle(pattern: str, flags: int) -> Needle | None:
    """The needle of a ``regex``/``re`` pattern compiled with ``flags``; None when the
    pattern requires no literal that this reading can prove."""
    flags = int(flags) & ~_V0
    if flags & ~_KNOWN_FLAGS or not _PARSER:
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
    if not found:
        return None
    terms = {tuple(sorted({w.casefold() if folded else w for w in t}, key=lambda w: (-len(w), w)))
             for t in found}  # the longest string of each first: the likeliest to be absent
    return Needle(tuple(sorted(terms, key=lambda t: (-_strength(t), t))), folded)


def _strength(term: tuple[str, ...] | frozenset[str]) -> int:
    return max(map(len, term))


def _quality(dnf: Dnf) -> int:
    """How rarely the weakest alternative of ``dnf`` holds, roughly: its longest string."""
    return min(map(_strength, dnf))


def _all_of(factors: list[Dnf]) -> Dnf | None:
    """The AND of requirements, strongest first, multiplied out while it stays within
    _MAX_TERMS (a factor left out weakens the needle, never wrongs it)."""
    if not factors:
        return None
    factors = sorted(set(factors), key=_quality, reverse=True)
    out = factors[0]
    for f in factors[1:]:
        product = frozenset(a | b for a in out for b in f)
        if len(product) <= _MAX_TERMS:
            out = product
    return _absorbed(out)


def _absorbed(dnf: Dnf) -> Dnf:
    """Without the ANDs that hold another (``a`` OR ``a AND b`` is ``a``)."""
    return frozenset(t for t in dnf if not any(o < t for o in dnf))


def _required(items: list[tuple[Any, Any]], folded: bool) -> Dnf | None:
    """What every match of the sequence holds (an OR of ANDs); None: nothing known."""
    factors: list[Dnf] = []
    run: list[str] = []

    def end_run() -> None:
        if run:
            factors.append(frozenset([frozenset(["".join(run)[:_MAX_LEN]])]))
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
        if op is _sre.BRANCH and run:  # re's parser moves a common prefix out of the branches
            # (next|nigeria: "n", then ext|igeria): put it back in front of each
            prefix = [(_sre.LITERAL, ord(c)) for c in "".join(run)]
            run.clear()
            av = (av[0], [prefix + list(b) for b in av[1]])
        end_run()
        sub: Dnf | None = None
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
                sub = _absorbed(frozenset().union(*[b for b in branches if b is not None]))
        if sub:
            factors.append(sub)
    end_run()
    return _all_of(factors)


_EDGES = re.compile(r"(\\b)?\(\?:(.*)\)(\\b)?", re.S)  # \b(?:A|B|…)\b, either \b optional


def alternatives(pattern: str, flags: int) -> tuple[str, ...] | None:
    r"""One pattern per alternative of ``pattern``, which together match where it matches:
    ``\b(?:A|B)\b`` gives ``\b(?:A)\b`` and ``\b(?:B)\b``, and ``A|B`` gives ``A`` and ``B``
    (a sequence distributes over an alternation). Searched one by one, each alternative gets a
    needle of its own and, most often, a leading literal the regex engine can look for, where
    the whole alternation is tried at every position of the text.

    None when the pattern has no such form, or the split is not proved: no capturing group
    (numbering, back-references), no inline or verbose flags, and each alternative, parsed
    alone, must give the whole pattern's parse of it: re's parser moves what all alternatives
    begin with out in front of the branch (``order\s+now|order\s+today``), which the check
    puts back; one-character alternatives it makes a class, which is not split."""
    flags = int(flags) & ~_V0
    if flags & ~_KNOWN_FLAGS or flags & re.X or not _PARSER:
        return None
    try:
        parsed = _sre.parse(pattern, flags)
    except (re.error, RecursionError, OverflowError):
        return None
    if parsed.state.groups != 1 or (int(parsed.state.flags) | re.U) != (flags | re.U):
        return None
    items = list(parsed)
    at = (_sre.AT, _sre.AT_BOUNDARY)
    where = [i for i, (op, _) in enumerate(items) if op is _sre.BRANCH]
    if len(where) != 1:
        return None
    k = where[0]
    branch = items[k][1][1]
    # (head, the alternatives' text, tail, the items in front of the branch): re's parser
    # inlines the group, and moves what all alternatives start with out in front of them
    shapes = []
    if k == len(items) - 1:  # A|B
        shapes.append(("", pattern, "", items[:k]))
    if m := _EDGES.fullmatch(pattern):  # (?:A|B)
        head, tail = m.group(1) or "", m.group(3) or ""
        if items[:bool(head)] == [at] * bool(head) and items[k + 1:] == [at] * bool(tail):
            shapes.append((head, m.group(2), tail, items[bool(head):k]))
    for head, body, tail, shared in shapes:
        parts = _split_bars(body)
        if parts is None or len(parts) != len(branch) or not all(
                _parses_as(p, flags, [*shared, *sub]) for p, sub in zip(parts, branch, strict=True)):
            continue
        if head or tail:
            return tuple(f"{head}(?:{p}){tail}" for p in parts)
        return tuple(parts)
    return None


def _parses_as(part: str, flags: int, sub: Any) -> bool:
    try:
        return _tree(_sre.parse(part, flags)) == _tree(sub)
    except (re.error, RecursionError, OverflowError):
        return False


def _split_bars(body: str) -> list[str] | None:
    """``body`` cut at each ``|`` outside escapes, classes and groups."""
    parts, depth, start, i, n = [], 0, 0, 0, len(body)
    while i < n:
        c = body[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a class: ']' first (or after '^') is a member, escapes inside
            i += 1
            if i < n and body[i] == "^":
                i += 1
            if i < n and body[i] == "]":
                i += 1
            while i < n and body[i] != "]":
                i += 2 if body[i] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return None
        elif c == "|" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
        i += 1
    if depth:
        return None
    parts.append(body[start:])
    return parts


def _tree(node: Any) -> Any:
    """A parse (re._parser's SubPattern, its lists and tuples) as nested tuples, to compare."""
    if isinstance(node, _sre.SubPattern | list | tuple):
        return tuple(_tree(x) for x in node)
    return node


_KNOWN: tuple[tuple[str, int, Needle | None, tuple[str, ...] | None], ...] = (
    (r"next\s+of\s+kin|nigeria", int(re.I),
     Needle((("nigeria",), ("next", "kin", "of")), True), (r"next\s+of\s+kin", "nigeria")),
    (r"(?:viagra|cialis)\s+\d+mg", 0, Needle((("cialis", "mg"), ("viagra", "mg")), False), None),
    (r"order\s+now|order\s+today", 0, Needle((("order", "now"), ("order", "today")), False),
     (r"order\s+now", r"order\s+today")),
    (r"(?>free)\s+(?:money)+", 0, Needle((("money", "free"),), False), None),
    (r"[a-z]+\.", 0, Needle(((".",),), False), None),
    (r"\d+\s*\w*", 0, None, None),
)


def check_parser() -> str | None:
    """None when ``re._parser`` is there and gives the known needles and splits; else why not."""
    if _sre is None:
        return "re._parser or one of its opcodes is missing"
    for pattern, flags, want_needle, want_split in _KNOWN:
        got_needle, got_split = needle(pattern, flags), alternatives(pattern, flags)
        if got_needle != want_needle or got_split != want_split:
            return f"the literals read from /{pattern}/ are not the known ones"
    return None


def install() -> bool:
    """Check the parser (once per process); needles and splits only when it passed."""
    global _PARSER
    _PARSER = True  # for the check itself
    _PARSER = patches.install("re._parser.literals", check_parser)
    return _PARSER


_PARSER = install()
