"""The Public Suffix List (``publicsuffixlist``'s bundled copy, no network) in less memory.

The package keeps its ~11,000 rules as a ``frozenset`` of ``str``: 1.3 MB of a full-chain
gateway that peaks at ~53 MB under load. :class:`CompactNames` holds the same rules in one
UTF-8 blob, the end offset of each rule, each rule's ``hash()`` and an open-addressing table of
rule numbers (~0.4 MB, no object per rule) and answers the ``in`` tests the package's lookups
make, exactly (a hash match is confirmed on the rule's bytes). :class:`SuffixList` is the
package's class with its rule file read into that container line by line; the lookups
(wildcards, exceptions, the implicit ``*`` rule) stay the package's own.

``SuffixList`` overrides the package's private ``_parse`` and fills its ``_publicsuffix`` and
``_maxlabel``; it is used only once it gives the package's answers on a known list (patch
``publicsuffixlist.compact-rules``, gateway/patches.py). Otherwise the package's own class
reads the list (1.3 MB more per process), with one warning line.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Iterable
from typing import Any

from publicsuffixlist import PublicSuffixList, encode_idn

from gateway import patches


class CompactNames:
    """A set of strings built once, supporting only ``in`` and ``len``."""

    __slots__ = ("_blob", "_ends", "_hashes", "_table", "_mask")

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._blob = bytearray()
        self._ends = array("I")
        self._hashes = array("q")
        self._table = array("i", [-1]) * 8
        self._mask = 7
        for name in names:
            self.add(name)

    def __len__(self) -> int:
        return len(self._hashes)

    def _slot(self, name: str, h: int) -> int:
        """The table slot that holds ``name``'s rule number, or the empty slot it would take."""
        table, mask, hashes, ends = self._table, self._mask, self._hashes, self._ends
        i = h & mask
        encoded: bytes | None = None
        while (j := table[i]) >= 0:
            if hashes[j] == h:
                if encoded is None:
                    encoded = name.encode("utf-8", "surrogatepass")
                if self._blob[ends[j - 1] if j else 0:ends[j]] == encoded:
                    return i
            i = (i + 1) & mask
        return i

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._table[self._slot(name, hash(name))] >= 0

    def add(self, name: str) -> None:
        h = hash(name)
        i = self._slot(name, h)
        if self._table[i] >= 0:
            return
        self._table[i] = len(self._hashes)
        self._blob += name.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._blob))
        self._hashes.append(h)
        if 3 * len(self._hashes) > len(self._table):  # keep the table at most a third full
            self._grow()

    def _grow(self) -> None:
        size = len(self._table) * 4
        table, mask = array("i", [-1]) * size, size - 1
        for j, h in enumerate(self._hashes):
            i = h & mask
            while table[i] >= 0:
                i = (i + 1) & mask
            table[i] = j
        self._table, self._mask = table, mask


class SuffixList(PublicSuffixList):
    """``PublicSuffixList`` with its rules in a :class:`CompactNames`."""

    def _parse(self, source: Any, accept_encoded_idn: bool, only_icann: bool = False) -> None:
        if only_icann:  # the package's own reading of the ICANN section markers
            super()._parse(source, accept_encoded_idn, only_icann=True)
            return
        if isinstance(source, (str, bytes, bytearray)):
            source = source.splitlines()
        rules, maxlabel = CompactNames(), 0
        for line in source:
            text = line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else line
            rule = text.lower().split(" ")[0].rstrip()
            if not rule or rule.startswith("//"):
                continue
            maxlabel = max(maxlabel, rule.count(".") + 1)
            rules.add(rule)
            if accept_encoded_idn:  # the punycode form too, as the package does
                bang = "!" if rule.startswith("!") else ""
                rules.add(bang + encode_idn(rule.lstrip("!")))
        self._publicsuffix = rules
        self._maxlabel = maxlabel


_KNOWN_LIST = """// ===BEGIN ICANN DOMAINS===
com
uk
co.uk
*.ck
!www.ck
рф
// ===END ICANN DOMAINS===
// ===BEGIN PRIVATE DOMAINS===
blogspot.com
// ===END PRIVATE DOMAINS===
"""
_KNOWN_NAMES = ("a.b.example.com", "x.co.uk", "co.uk", "www.ck", "a.b.ck", "foo.blogspot.com",
                "unknown.zz", "пример.рф", "xn--e1afmkfd.xn--p1ai", "com")


def check_compact_rules() -> str | None:
    """None when the package still reads its list through ``_parse(source,
    accept_encoded_idn, only_icann)`` and :class:`SuffixList` answers as the package's own
    class for known names on a known list; else why not."""
    if not patches.calls(PublicSuffixList.__init__, "_parse"):
        return "PublicSuffixList() no longer reads its list through _parse"
    code = PublicSuffixList._parse.__code__
    if code.co_varnames[:code.co_argcount] != ("self", "source", "accept_encoded_idn",
                                                "only_icann"):
        return "PublicSuffixList._parse takes other arguments"
    for only_icann in (False, True):
        own = PublicSuffixList(_KNOWN_LIST, only_icann=only_icann)
        ours = SuffixList(_KNOWN_LIST, only_icann=only_icann)
        for name in _KNOWN_NAMES:
            for ask in ("publicsuffix", "privatesuffix", "is_public"):
                if getattr(ours, ask)(name) != getattr(own, ask)(name):
                    return f"{ask}({name!r}) differs from the package's on a known list"
    return None


_lock = threading.Lock()
_list: PublicSuffixList | None = None


def suffix_list() -> PublicSuffixList:
    """The process's PSL (the package's bundled file), read on first use."""
    global _list
    if _list is None:
        with _lock:
            if _list is None:
                compact = patches.install("publicsuffixlist.compact-rules", check_compact_rules)
                _list = SuffixList() if compact else PublicSuffixList()
    return _list
