"""filters/_psl.py reads the Public Suffix List into a compact container through the package's
private ``_parse`` (patch ``publicsuffixlist.compact-rules``). When that no longer answers as the
package does on a known list, the package's own class reads the list, one warning names the
patch, and the organizational domains DMARC uses are still right."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from publicsuffixlist import PublicSuffixList

from filters import _psl
from gateway import patches
from tests.support.patches import kept_patch_status, patch_warnings


@pytest.fixture
def restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_psl, "_list", None)
    with kept_patch_status():
        yield


ORG = {"a.b.example.co.uk": "example.co.uk", "mail.example.com": "example.com",
       "x.y.blogspot.com": "y.blogspot.com", "co.uk": None}


def test_compact_rules_are_checked_and_used(restored, caplog):
    patches.forget("publicsuffixlist.compact-rules")
    psl = _psl.suffix_list()
    assert type(psl) is _psl.SuffixList and patch_warnings(caplog) == []
    assert {d: psl.privatesuffix(d) for d in ORG} == ORG


def test_a_changed_package_reads_its_own_list(restored, monkeypatch, caplog):
    real = _psl.SuffixList._parse

    def drops_exceptions(self: _psl.SuffixList, source: object, accept_encoded_idn: bool,
                         only_icann: bool = False) -> None:
        lines = source.splitlines() if isinstance(source, str) else source
        real(self, [x for x in lines if not str(x).startswith("!")], accept_encoded_idn,
             only_icann)

    monkeypatch.setattr(_psl.SuffixList, "_parse", drops_exceptions)
    patches.forget("publicsuffixlist.compact-rules")
    psl = _psl.suffix_list()
    assert patch_warnings(caplog) == ["patch publicsuffixlist.compact-rules disabled, the library's "
                                      "own path is used: publicsuffix('www.ck') differs from the "
                                      "package's on a known list"]
    assert type(psl) is PublicSuffixList
    assert {d: psl.privatesuffix(d) for d in ORG} == ORG
    assert _psl.suffix_list() is psl and len(patch_warnings(caplog)) == 1
