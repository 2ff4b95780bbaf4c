"""The rules engine's uses of CPython's private ``re._parser`` (filters/_literals.py's needles
and splits, filters/_rulefile.py's backtracking check) prove themselves on known patterns
first. When the parser answers differently or a symbol is gone, they step aside (one warning
line naming the patch) and the rules still hit exactly as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from filters import _literals, _rulefile
from gateway import patches
from tests.filters.test_rules import hits
from tests.support.patches import kept_patch_status, patch_warnings

RULES = r"""
body     KIN      /next\s+of\s+kin|nigeria/i
body     PILLS    /(?:viagra|cialis)\s+\d+mg/
header   SUBJ     Subject =~ /order\s+(?:now|today)/i
body     NEVER    /unclaimed\s+fortune/
"""
MSG = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: ORDER   Today\r\n\r\n"
       b"I am the Next  of KIN of a prince.\r\nTake viagra 50mg.\r\n")
EXPECTED = {"KIN", "PILLS", "SUBJ"}


@pytest.fixture
def restored() -> Iterator[None]:
    literals, backtracking = _literals._PARSER, _rulefile._BACKTRACKING_CHECK
    with kept_patch_status():
        yield
    _literals._PARSER, _rulefile._BACKTRACKING_CHECK = literals, backtracking


def test_both_are_active_and_used_here(tmp_path: Path) -> None:
    assert patches.active("re._parser.literals") and patches.active("re._parser.backtracking")
    assert _literals.needle(r"next\s+of\s+kin", 0) is not None
    with pytest.raises(ValueError, match="backtrack"):
        _rulefile.compile_perl("/(a+)+/")
    assert hits(tmp_path, RULES, MSG) == EXPECTED


class _Renumbered(SimpleNamespace):
    """``re._parser`` after an upgrade that renumbered an opcode the walk relies on."""


@pytest.mark.parametrize("fault", ["changed opcode", "module gone"])
def test_a_changed_parser_gives_no_needles_and_the_rules_still_hit(
        tmp_path, restored, monkeypatch, caplog, fault):
    if fault == "changed opcode":
        real = _literals._sre
        fake = _Renumbered(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
        fake.LITERAL = object()  # no longer the opcode the parse carries
        monkeypatch.setattr(_literals, "_sre", fake)
        why = r"the literals read from /next\s+of\s+kin|nigeria/ are not the known ones"
    else:
        monkeypatch.setattr(_literals, "_sre", None)
        why = "re._parser or one of its opcodes is missing"
    patches.forget("re._parser.literals")
    assert _literals.install() is False
    assert patch_warnings(caplog) == [f"patch re._parser.literals disabled, the library's own path is "
                                      f"used: {why}"]
    assert _literals.needle(r"next\s+of\s+kin", 0) is None  # no prefilter: every regex runs
    assert _literals.alternatives(r"order\s+now|order\s+today", 0) is None
    assert hits(tmp_path, RULES, MSG) == EXPECTED
    assert hits(tmp_path, RULES, MSG.replace(b"KIN", b"KITH")) == EXPECTED - {"KIN"}


def test_a_changed_parser_skips_the_backtracking_refusal_only(tmp_path, restored, monkeypatch,
                                                              caplog):
    real = _rulefile._sre
    fake = SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    del fake.MAX_REPEAT  # renamed in a later Python
    monkeypatch.setattr(_rulefile, "_sre", fake)
    patches.forget("re._parser.backtracking")
    _rulefile._BACKTRACKING_CHECK = patches.install("re._parser.backtracking",
                                                    _rulefile.check_backtracking)
    assert len(patch_warnings(caplog)) == 1
    assert patch_warnings(caplog)[0].startswith("patch re._parser.backtracking disabled, the "
                                          "library's own path is used: check raised "
                                          "AttributeError")
    compiled, _ = _rulefile.compile_perl("/(a+)+b/")  # loads: regex's timeout bounds it
    assert compiled.search("aab")
    assert hits(tmp_path, RULES, MSG) == EXPECTED
