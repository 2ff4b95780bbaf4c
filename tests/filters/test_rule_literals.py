"""The rules filter's literal prefilter (filters._literals): which literals a pattern requires,
the case folding it relies on (checked against ``regex`` for every cased code point), that it
never rules out a text the regex matches (random patterns and texts; the shipped rules on the
SpamAssassin corpus), and that a rule whose needle is absent is not searched at all."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import regex

from filters import rules as rules_module
from filters._literals import Needle, alternatives, containments, fold, needle
from filters._rulefile import compile_perl
from filters.rules import RulesFilter, _Scan
from gateway.mime import parse_bytes
from gateway.services import Services
from tests.support.gateway import REPO

CORPUS = REPO.parent / "shared" / "corpora" / "spamassassin" / "train"


def lits(pattern: str, flags: int = 0) -> tuple[tuple[str, ...], ...] | None:
    n = needle(pattern, flags)
    return None if n is None else n.terms


@pytest.mark.parametrize("pattern,flags,expected", [
    ("viagra", 0, (("viagra",),)),
    ("Viagra", re.I, (("viagra",),)),
    (r"\bclick\s+here\b", re.I, (("click", "here"),)),  # a sequence needs all its parts
    (r"(?:cheap|free)\s+pills", 0, (("cheap", "pills"), ("pills", "free"))),
    (r"\b(?:cheap|free)\b", 0, (("cheap",), ("free",))),  # one branch or the other
    (r"next\s+of\s+kin|nigeria", re.I, (("nigeria",), ("next", "kin", "of"))),  # re's common
    # prefix ("n") is put back in front of each branch
    (r"(?:cheap|\w+)pills?", 0, (("pill",),)),  # a branch with no literal: the branch is useless
    (r"(?:cheap|\w+)", 0, None),
    (r"a(?:bc)?d", 0, (("a", "d"),)),  # an optional group requires nothing
    (r"(?:ab)+x", 0, (("ab", "x"),)),
    (r"!{3,}", 0, (("!!!",),)),
    (r"x{2}y", 0, (("xxy",),)),
    (r"x{2,4}y", 0, (("xx", "y"),)),
    (r"x*", 0, None),
    (r"[abc]+\d", 0, None),
    (r"(?=foo)\w+", 0, None),  # lookarounds count for nothing
    (r"(?i:abc)d", 0, (("d",),)),  # a group with its own flags counts for nothing
    (r"(?i)abc", 0, (("abc",),)),
    (r"XJS\*C4J\.X", 0, (("XJS*C4J.X",),)),
    ("caf\u00e9s", 0, (("caf\u00e9s",),)),  # case-sensitive: non-ASCII kept
    ("caf\u00e9s", re.I, (("caf", "s"),)),  # folded: ASCII runs only
    (r"a b", re.X, (("ab",),)),
    (r"\m", 0, None),  # not re syntax: no needle (the regex always runs)
    (r"foo", int(regex.F), None),  # full case folding: flags it does not know
    (r"foo", int(regex.V1), None),
])
def test_needles(pattern, flags, expected):
    assert lits(pattern, flags) == expected


def test_the_ands_multiply_out_only_so_far():
    """Six factors of two alternatives each: 64 ANDs; past _MAX_TERMS (32) a factor is left
    out (a weaker needle, never a wrong one)."""
    n = needle("(?:ab|cd)(?:ef|gh)(?:ij|kl)(?:mn|op)(?:qr|st)(?:uv|wx)", 0)
    assert n is not None and len(n.terms) == 32
    assert n.in_text("abefijmnqruv") and n.in_text("cdghklopstwx") and not n.in_text("ab ef")


def test_regex_flags_of_a_compiled_pattern_are_understood():
    p = regex.compile(r"\bpills\b", regex.I | regex.M)
    assert needle(p.pattern, p.flags) == Needle((("pills",),), True)


def _cased() -> list[str]:
    return [c for c in map(chr, range(0x80, sys.maxunicode + 1))
            if not 0xD800 <= ord(c) < 0xE000
            and (c.lower() != c or c.upper() != c or c.casefold() != c or c.title() != c)]


def test_fold_maps_every_character_regex_equates_with_an_ascii_one_to_that_one():
    """The claim the folded test rests on: if ``regex`` (ignoring case) matches printable
    ASCII ``a`` at a character ``c`` beyond ASCII, fold(c) is exactly a folded."""
    asc = [chr(i) for i in range(0x21, 0x7F)]
    pats = [(a, regex.compile(regex.escape(a), regex.I)) for a in asc]
    seen = {}
    for c in _cased():
        for a, p in pats:
            if p.fullmatch(c):
                assert fold(c) == a.casefold(), (hex(ord(c)), a)
                seen[c] = a
    # what regex equates today: İ ı ſ K (if a new version adds one, the check above covers it)
    assert {"\u0130", "\u0131", "\u017f", "\u212a"} <= set(seen)
    anyascii = regex.compile(r"[!-~]", regex.I)  # and no uncased character at all
    for cp in range(0x80, sys.maxunicode + 1):
        if not 0xD800 <= cp < 0xE000 and anyascii.fullmatch(chr(cp)):
            assert chr(cp) in seen, hex(cp)
    for a in asc:
        assert fold(a) == a.casefold() and len(fold(a)) == 1


# -- soundness: a needle never rules out a text the regex matches --------------------------------

_ATOMS = ["a", "b", "k", "s", "i", "ab", "ba", "KI", "S", r"\s", r"\w", ".", "[ab]", r"\d",
          "!", "-", r"\b", "^", "$"]
_TEXT = "abkisKIS!- \n1\u0130\u0131\u017f\u212a\u00e9\u00df"


def _pattern(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.15 and depth < 3:
            alts = "|".join(_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            atom = rng.choice(["(?:%s)", "(%s)", "(?>%s)"]) % alts
        else:
            atom = rng.choice(_ATOMS)
        if rng.random() < 0.3 and atom not in (r"\b", "^", "$"):
            atom += rng.choice(["?", "*", "+", "{2}", "{0,2}", "{1,3}", "{2,}", "+?"])
        parts.append(atom)
    return "".join(parts)


def test_random_patterns_and_texts_never_lose_a_match():
    rng = random.Random(20261129)
    checked = skipped = 0
    for _ in range(3000):
        pat = _pattern(rng)
        flags = rng.choice([0, re.I, re.I | re.M, re.S])
        n = needle(pat, flags)
        if n is None:
            continue
        compiled = regex.compile(pat, flags)
        for _ in range(20):
            text = "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, 12)))
            hay = fold(text) if n.folded else text
            if not n.in_text(hay):
                skipped += 1
                assert compiled.search(text) is None, (pat, flags, text, n)
            checked += 1
    assert checked > 20000 and skipped > 5000  # the check ran, and the needles did rule out


class _Counted(str):
    """A text that counts the substring searches made in it."""
    searches = 0

    def __contains__(self, s: object) -> bool:
        type(self).searches += 1
        return super().__contains__(s)  # type: ignore[operator]


def test_containments_name_the_needle_strings_each_string_holds():
    needles = [Needle((("free gift",), ("gift",)), True), Needle(((" free",), ("free",)), True),
               None, Needle((("act now", "now"),), False)]
    assert containments(needles) == {"free gift": ("free", "gift"), " free": ("free",),
                                     "act now": ("now",)}


def test_random_needles_sharing_a_memo_and_containments_answer_as_alone():
    # a string known absent rules out every needle string containing it; with the table the
    # answers stay those of each needle tested alone, and fewer searches are made
    rng = random.Random(20261130)
    needles = [n for n in (needle(_pattern(rng), rng.choice([0, re.I])) for _ in range(400))
               if n is not None]
    table = containments(needles)
    assert len(table) > 20
    fewer = 0
    for _ in range(300):
        text = "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, 40)))
        order = rng.sample(needles, len(needles))
        _Counted.searches = 0
        memos: dict[bool, dict[str, bool]] = {True: {}, False: {}}
        hays = {True: _Counted(fold(text)), False: _Counted(text)}
        got = [n.in_text(hays[n.folded], memos[n.folded], table) for n in order]
        with_table = _Counted.searches
        _Counted.searches = 0
        memos = {True: {}, False: {}}
        want = [n.in_text(hays[n.folded], memos[n.folded]) for n in order]
        assert got == want, text
        assert want == [n.in_text(fold(text) if n.folded else text) for n in order]
        fewer += with_table < _Counted.searches
    assert fewer > 100


def _shipped() -> RulesFilter:
    return RulesFilter.from_config({"shipped": True},
                                   Services(policy_dir=REPO / "policies"))


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared/corpora not beside the repository")
def test_shipped_rules_on_the_corpus_same_hits_with_and_without_needles():
    f = _shipped()
    with_needle = [r for r in f.rules.rules.values() if r.needle is not None]
    assert len(with_needle) >= 20
    ruled_out = 0
    for path in sorted(CORPUS.glob("*/*")):
        raw = path.read_bytes()
        scan = _Scan(parse_bytes(raw), raw, f.max_scan_bytes)
        for rule in with_needle:
            hit = rule.regex.search(scan.text(rule.kind)) is not None
            if scan._lacks(rule.kind, rule.needle):
                ruled_out += 1
                assert not hit, (path.name, rule.name)
            assert scan._hit(rule, 1.0) is hit, (path.name, rule.name)
    assert ruled_out > 1000


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared/corpora not beside the repository")
def test_shipped_rules_on_the_corpus_same_hits_with_and_without_containments(monkeypatch):
    f = _shipped()
    assert len(f.within) >= 10
    monkeypatch.setattr(rules_module, "_IMPLY_MIN_CHARS", 0)  # every text, not only long ones
    for path in sorted(CORPUS.glob("*/*")):
        raw = path.read_bytes()
        view = parse_bytes(raw)
        plain = _Scan(view, raw, f.max_scan_bytes).hits(f.rules, 1.0, 60.0)
        assert _Scan(view, raw, f.max_scan_bytes, f.within).hits(f.rules, 1.0, 60.0) == plain


class _Refuses:
    pattern, flags = "x", 0

    def search(self, *a: object, **k: object) -> None:
        raise AssertionError("searched although its needle is absent")


def test_a_rule_whose_needle_is_absent_is_not_searched(tmp_path: Path):
    f = _shipped()
    rule = f.rules.rules["PHARMA_WORDS"]
    assert rule.needle is not None
    raw = b"From: a@example.test\r\nSubject: notes\r\n\r\nthe meeting notes, attached\r\n"
    rule.regex = _Refuses()
    assert rule.alternatives  # split: each alternative behind its own needle
    rule.alternatives = tuple((_Refuses(), n) for _, n in rule.alternatives)
    assert _Scan(parse_bytes(raw), raw, 65536)._hit(rule, 1.0) is False
    spam = raw.replace(b"attached", b"cheap VIAGRA here")
    with pytest.raises(AssertionError, match="searched"):
        _Scan(parse_bytes(spam), spam, 65536)._hit(rule, 1.0)


# -- alternatives: \b(?:A|B)\b searched as \b(?:A)\b, then \b(?:B)\b ------------------------------

@pytest.mark.parametrize(("pattern", "flags", "expected"), [
    (r"\b(?:act\s+now|buy\s+(?:now|today))\b", re.I,
     (r"\b(?:act\s+now)\b", r"\b(?:buy\s+(?:now|today))\b")),
    (r"\b(?:ab|cd)", 0, (r"\b(?:ab)", r"\b(?:cd)")),
    (r"(?:ab|cd)", 0, ("ab", "cd")),
    (r"(?:ab)|(?:cd)|e\|f", 0, ("(?:ab)", "(?:cd)", r"e\|f")),
    (r"\b(?:[a|b]x|y[)|(]y|\(z\|)\b", 0, (r"\b(?:[a|b]x)\b", r"\b(?:y[)|(]y)\b", r"\b(?:\(z\|)\b")),
    (r"\b(?:[]|]x|yy)\b", 0, (r"\b(?:[]|]x)\b", r"\b(?:yy)\b")),
    ("abc", 0, None),  # nothing to split
    ("a|b", 0, None),  # re's parser made it a class [ab]
    (r"\b(?:order\s+now|order\s+today)\b", re.I,  # re moves "order\s+" out: put back
     (r"\b(?:order\s+now)\b", r"\b(?:order\s+today)\b")),
    (r"\bno (?:cost|risk)\b|\brisk-free\b", re.I, (r"\bno (?:cost|risk)\b", r"\brisk-free\b")),
    (r"\bx(?:ab|cd)\b", 0, None),  # something in front of the group
    ("(ab|cd)", 0, None),  # a capturing group
    (r"(?:ab|cd)\1", 0, None),  # a back-reference (no group 1: no pattern at all)
    ("(?>ab|cd)", 0, None),  # atomic: the first alternative that matches is final
    (r"\b(?:ab|cd)x", 0, None),  # something after the group other than \b
    ("^(?:ab|cd)$", 0, None),  # anchors other than \b around it
    ("(?s)ab|cd", 0, None),  # an inline flag the split would keep on one side only
    ("ab|cd", re.X, None),  # verbose: comments and spaces are the parser's
    ("ab|(cd", 0, None),  # no pattern
])
def test_alternatives(pattern, flags, expected):
    assert alternatives(pattern, flags) == expected


def test_random_alternations_split_match_exactly_where_the_whole_does():
    """Each alternative searched alone: some match exactly when the whole pattern does."""
    rng = random.Random(20261130)
    split = checked = hits = 0
    for _ in range(3000):
        alts = [_pattern(rng, 1) for _ in range(rng.randint(2, 4))]
        pat = rng.choice([r"\b(?:%s)\b", "(?:%s)", "%s", r"\b(?:%s)"]) % "|".join(alts)
        flags = rng.choice([0, re.I, re.I | re.M, re.S])
        parts = alternatives(pat, flags)
        if parts is None:
            continue
        split += 1
        whole = regex.compile(pat, flags)
        each = [regex.compile(p, flags) for p in parts]
        for _ in range(20):
            text = "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, 12)))
            found = whole.search(text) is not None
            assert any(e.search(text) for e in each) is found, (pat, flags, text, parts)
            checked += 1
            hits += found
    assert split > 1000 and hits > 2000 and checked - hits > 2000


def test_shipped_alternation_rules_are_split():
    rules = _shipped().rules.rules
    split = {name for name, r in rules.items() if r.alternatives}
    assert {"URGENT_ACTION", "ADVANCE_FEE", "MONEY_PHRASES", "PHARMA_WORDS", "FREE_OFFER",
            "NO_OBLIGATION"} <= split


def test_perl_braces_that_are_no_quantifier_stay_literal():
    """Perl (and re) read ``o{e<=1}`` as the literal text; regex would read fuzzy matching."""
    compiled, _ = compile_perl(r"/foo{e<=1}/")
    assert compiled.search("foo{e<=1}") and not compiled.search("fxo")
    assert lits(compiled.pattern, compiled.flags) == (("foo{e<=1}",),)
    compiled, _ = compile_perl(r"/fo{2}x{1,}y{,2}/")
    assert compiled.search("foox") and not compiled.search("fo{2}x")


# -- the substring shortcuts in front of whole-text regex passes ----------------------------------

def test_shortcuts_give_what_the_regex_passes_give():
    """_paragraphs and find_urls skip a regex pass when a substring test shows it would change
    nothing: the results equal the plain regex formulation on random texts."""
    from filters.rules import _PARA, _paragraphs, _squeeze
    from gateway.mime import _TRAILING, _URL, find_urls

    ws = re.compile(r"[ \t\r\f\v\xa0]+")  # SpamAssassin's white space, each run one space

    def paragraphs_plain(text: str) -> str:
        return "\n".join(p for p in (ws.sub(" ", " ".join(par.split("\n"))).strip()
                                     for par in _PARA.split(text)) if p)

    pieces = ["word", " ", "  ", "\n", "\n\n", "\t", "\xa0", "\r", "\f", "\v", "x", "WWW.",
              "www.example.test", "http", "://", "HTTPS://a.test/x", ".", ")", " " * 7,
              "\r\n", " \t\xa0 \r"]
    rng = random.Random(5322)
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        assert _paragraphs(text) == paragraphs_plain(text), repr(text)
        assert _squeeze(text) == ws.sub(" ", text), repr(text)
        assert find_urls(text) == [m.group(0).rstrip(_TRAILING) for m in _URL.finditer(text)]
    long_run = "a" + " " * 1000 + "\t" * 3 + "b\r"
    assert _squeeze(long_run) == ws.sub(" ", long_run) == "a b "
