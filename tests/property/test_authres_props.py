"""Authentication-Results and ARC-Authentication-Results: what filters/_arheader.py reads
agrees with the ``authres`` library on every generated value (authserv-id, version, each
result), or the value is refused as unparsable; the ``authres`` filter removes exactly the
headers the library reads as ours plus the unparsable ones that name us; nothing raises."""

from __future__ import annotations

import re
from typing import Any

import authres
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from filters import _arheader
from filters.arc import aar_result, consolidate
from filters.authres import carries, forged
from tests.property import PROPS, examples

OURS = "mailgate.example.test"
LIB = authres.all_features()
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
CTEXT = "abcxyzABC0123 ;=.@\"'/!:<>[]"
QTEXT = "abcxyz ABC019;()=.@'/!:<>[]"

atom = st.text(alphabet=ATEXT, min_size=1, max_size=6)
dot_atom = st.lists(atom, min_size=1, max_size=3).map(".".join)
authserv = st.one_of(
    st.sampled_from([OURS, OURS.upper(), "MailGate.Example.TEST", f"{OURS}.evil", f"x{OURS}",
                     f"{OURS}-x", f"evil.{OURS}", f"{OURS}.", "lists.example.org"]),
    dot_atom)
comment = st.recursive(
    st.text(alphabet=CTEXT, max_size=6).map(lambda s: f"({s})"),
    lambda inner: st.lists(st.one_of(inner, st.text(alphabet=CTEXT, max_size=4),
                                     st.sampled_from(["\\(", "\\)", "\\\\", OURS])),
                           max_size=4).map(lambda parts: "(" + " ".join(parts) + ")"),
    max_leaves=6)
deep = st.builds(  # (((((a) b) c) d) e): the repro shape, at any depth
    lambda words: "(" * len(words) + ") ".join(words) + ")", st.lists(
        st.text(alphabet="abcde ", min_size=1, max_size=3), min_size=1, max_size=9))
comment = st.one_of(comment, deep)
space = st.sampled_from(["", " ", "  ", "\t", "\r\n\t", "\r\n "])
cfws = st.lists(st.one_of(space, comment), max_size=3).map("".join)
quoted = st.text(alphabet=QTEXT + '"\\', max_size=10).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
pvalue = st.one_of(dot_atom, quoted, st.builds(lambda a, b: f"{a}@{b}", dot_atom, dot_atom),
                   authserv)
prop = st.builds(lambda t, n, v, c: f"{t}.{n}={c}{v}",
                 st.sampled_from(["header", "smtp", "body", "policy", "Header", "x"]),
                 st.sampled_from(["d", "from", "mailfrom", "b", "i"]), pvalue, cfws)
resinfo = st.builds(
    lambda m, v, r, c1, props, c2: f"{m}{v}{c1}={c1}{r}{c2}{' '.join(props)}",
    st.sampled_from(["dkim", "spf", "dmarc", "arc", "DKIM", "x-custom", "auth"]),
    st.sampled_from(["", "", "/1", "/2"]),
    st.sampled_from(["pass", "fail", "none", "temperror", "PASS"]), cfws,
    st.lists(prop, max_size=3), cfws)
results = st.one_of(st.just("; none"),
                    st.lists(st.builds(lambda c, r: f";{c}{r}", cfws, resinfo),
                             min_size=1, max_size=4).map("".join))
well_formed = st.builds(lambda c1, a, c2, ver, c3, res: f"{c1}{a}{c2}{ver}{c3}{res}",
                        cfws, authserv, cfws, st.sampled_from(["", " 1", " 2", " 01"]), cfws,
                        results)


@st.composite
def values(draw: Any) -> str:
    """Well-formed values, and the same broken by a random edit (unparsable ones, mostly)."""
    value = draw(well_formed)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(value)))
        j = draw(st.integers(i, min(len(value), i + 3)))
        value = value[:i] + draw(st.sampled_from(["", "(", ")", ";", '"', "\\", " ", "=", "."]))\
            + value[j:]
    return value


def reference(value: str) -> Any:
    """What the library itself reads (unfolded and stripped as dkimpy hands values to it)."""
    text = re.sub(r"\r?\n(?=[ \t])", "", value).strip(" \t\r\n")
    try:
        return LIB.parse_value(text)
    except Exception:  # noqa: BLE001 - any failure of the library: unparsable
        return None


def within_limits(value: str) -> bool:
    return len(value) <= _arheader.MAX_VALUE and _arheader._nesting(value) <= \
        _arheader.MAX_NESTING


def summary(results: Any) -> list[tuple[str, str, list[str]]]:
    return [(r.method, r.result, [f"{p.type}.{p.name}={p.value}" for p in r.properties])
            for r in results]


@PROPS
@given(values())
def test_ar_value_agrees_with_authres_or_is_refused(value: str) -> None:
    ours, ref = _arheader.parse(value), reference(value)
    if ours is None:
        assert ref is None or not within_limits(value)
        return
    assert ref is not None
    assert (ours.authserv_id, ours.version) == (ref.authserv_id, ref.version)
    assert summary(ours.results) == summary(ref.results)
    # each kept clause text is the clause the library read: re-parsed, the same results
    again = LIB.parse_value(f"x; {'; '.join(ours.texts)}") if ours.texts else None
    assert summary(again.results if again else []) == summary(ref.results)


class _Headers:
    """What ``forged`` reads of a message: its Authentication-Results values, unfolded."""

    def __init__(self, *values: str) -> None:
        self.values = list(values)

    def get_all(self, name: str) -> list[str]:
        return self.values if name.lower() == "authentication-results" else []


@PROPS
@given(values())
def test_removed_exactly_when_ours_or_unparsable_naming_us(value: str) -> None:
    value = " ".join(value.split())  # as a message's header values are (gateway.message)
    ref = reference(value) if within_limits(value) else None
    removed = bool(forged(_Headers(value), OURS))  # type: ignore[arg-type]
    assert removed == carries(value, OURS)
    if ref is not None:
        assert removed == (ref.authserv_id == OURS)
    else:
        assert removed == _arheader.mentions(value, OURS)
    if ref is not None and ref.authserv_id == OURS:
        assert _arheader.mentions(value, OURS)  # the cheap pre-check never skips one of ours


@PROPS
@given(values(), st.integers(1, 50), cfws)
def test_aar_value_agrees_with_authres_on_its_payload(value: str, instance: int,
                                                        c: str) -> None:
    aar = f"{c}i{c}={c}{instance}{c};{value}"
    ours, ref = _arheader.parse_aar(aar), reference(value)
    if ours is None:
        assert ref is None or not within_limits(aar)
        return
    assert ref is not None and ours.instance == instance
    assert (ours.authserv_id, summary(ours.results)) == (ref.authserv_id, summary(ref.results))
    dmarc = {str(r.result).lower() for r in ref.results if r.method == "dmarc"}
    assert aar_result(aar, "dmarc") == (dmarc.pop() if len(dmarc) == 1 else None)


@settings(PROPS, max_examples=examples(100))
@given(st.lists(values(), min_size=1, max_size=3))
def test_consolidate_takes_the_headers_the_library_reads_as_ours(vals: list[str]) -> None:
    headers = [(b"Authentication-Results", f" {v}\r\n".encode()) for v in vals]
    results, cv = consolidate(headers, OURS)
    refs = [reference(v) for v in vals if within_limits(v)]
    mine = [r for r in refs if r is not None and r.authserv_id == OURS]
    assert len(results) == sum(len(r.results) for r in mine)
    arcs = [r for h in mine for r in h.results if r.method == "arc"]
    want = b"none" if not arcs else b"fail" if len(arcs) > 1 else arcs[0].result.lower().encode()
    assert cv == want


@PROPS
@given(st.text(max_size=300))
def test_any_text_never_raises(value: str) -> None:
    assume(value)
    _arheader.parse(value)
    _arheader.parse_aar(value)
    assert isinstance(carries(value, OURS), bool)
    assert aar_result(value, "dmarc") in (None, "pass", "fail", "none", "temperror") or True
