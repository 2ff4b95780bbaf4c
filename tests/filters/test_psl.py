"""filters/_psl.py: the Public Suffix List in a compact container, same answers as the package."""

from __future__ import annotations

import publicsuffixlist
import pytest

from filters._psl import CompactNames, SuffixList, suffix_list


class _Collide(str):
    """A name whose hash() is forced equal to its siblings'."""

    def __hash__(self) -> int:
        return 42


def test_compact_names_membership_is_exact() -> None:
    names = CompactNames(["com", "co.uk", "*.kobe.jp", "!city.kobe.jp", "公司.cn"])
    assert len(names) == 5
    for n in ("com", "co.uk", "*.kobe.jp", "!city.kobe.jp", "公司.cn"):
        assert n in names
    for n in ("", "uk", "co", "kobe.jp", "city.kobe.jp", "公司", b"com", None):
        assert n not in names


def test_compact_names_equal_hashes_are_told_apart_by_their_bytes() -> None:
    names = CompactNames([_Collide("a.test"), _Collide("b.test"), "c.test"])
    assert _Collide("a.test") in names and _Collide("b.test") in names
    assert _Collide("z.test") not in names  # same hash, different name
    assert len(names) == 3


def test_compact_names_dedupes_and_grows() -> None:
    words = [f"label{i}.example" for i in range(5000)]
    names = CompactNames(words + words[:100])
    assert len(names) == 5000
    assert all(w in names for w in words)
    assert "label5000.example" not in names


@pytest.fixture(scope="module")
def stock() -> publicsuffixlist.PublicSuffixList:
    return publicsuffixlist.PublicSuffixList()


def test_suffix_list_holds_the_packages_rules_compactly(stock) -> None:
    ours = suffix_list()
    assert isinstance(ours, SuffixList) and suffix_list() is ours
    assert isinstance(ours._publicsuffix, CompactNames)  # the point: no frozenset of str
    assert len(ours._publicsuffix) == len(stock._publicsuffix)
    assert all(rule in ours._publicsuffix for rule in stock._publicsuffix)


def test_suffix_list_answers_like_the_package(stock) -> None:
    ours = suffix_list()
    domains = ["mail.example.co.uk", "example", "a..b", ".", "公司.cn", "www.公司.cn",
               "xn--55qx5d.cn", "foo.bar.xn--55qx5d.cn", "EXAMPLE.COM.", "x.city.kobe.jp"]
    for rule in stock._publicsuffix:  # each rule, and names under it (wildcards, exceptions)
        base = rule.lstrip("!").removeprefix("*.")
        domains += [base, f"x.{base}", f"a.b.{base}", f"Mixed.CASE.{base.upper()}"]
    wrong = [d for d in domains
             if (ours.privatesuffix(d), ours.publicsuffix(d))
             != (stock.privatesuffix(d), stock.publicsuffix(d))]
    assert not wrong, wrong[:10]
    assert ours.privatesuffix("a.b.example.co.uk") == "example.co.uk"
    assert ours.publicsuffix("x.city.kobe.jp") == "kobe.jp"


def test_suffix_list_only_icann_is_the_packages_reading(stock) -> None:
    icann = SuffixList(only_icann=True)
    assert isinstance(icann._publicsuffix, frozenset)
    assert icann.privatesuffix("foo.blogspot.com") == "blogspot.com"  # a private-section rule
    assert suffix_list().privatesuffix("foo.blogspot.com") == "foo.blogspot.com"
