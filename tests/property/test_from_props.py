"""The RFC5322.From domains DMARC (and DKIM signing) trust: ``filters.dmarc.from_domains``
agrees with the standard library's strict reader, ``email.headerregistry`` (the parser of
``email.policy.default``), and with ``email.utils.getaddresses``, or refuses to name a single
trusted domain. A single trusted domain comes only from a value both read as exactly that
domain; otherwise every domain either shows is checked (RFC 7489 §6.6.1, with DMARC_BAD_FROM),
none left out and none added; a value neither can read yields none."""

from __future__ import annotations

import email.utils
from email.headerregistry import HeaderRegistry
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from filters.dmarc import from_domain, from_domains, shown_domains
from tests.property import PROPS

REGISTRY = HeaderRegistry()
ATEXT = "abcxyzABC019!#$%&'*+/=?^_`{|}~-"

atom = st.text(alphabet=ATEXT, min_size=1, max_size=5)
domain = st.one_of(st.sampled_from(["bank.example", "evil.example", "Bank.Example",
                                    "bank.example.", "[192.0.2.1]", "sub.bank.example"]),
                   st.lists(st.text(alphabet="abcxyz019-", min_size=1, max_size=5),
                            min_size=1, max_size=3).map(".".join))
local = st.one_of(atom, st.lists(atom, min_size=2, max_size=3).map(".".join), st.sampled_from(
    ['"a b"', '"a@bank.example"', '"x\\"y"', '""', '"a,b"@', "a..b", ".a"]))
display = st.one_of(st.just(""), atom, st.sampled_from(
    ['"Bank Support"', '"a@bank.example"', "Bank (comment)", "=?utf-8?q?Bank?=", "J. Smith",
     '"<a@bank.example>"', "a@bank.example", "Bank, Inc.", "Bank; x"]))
noise = st.sampled_from(["", " ", "(c)", "(nested (c))", ",", ";", "<", ">", "@", '"', ":",
                         "\\", "\t", " (a@bank.example) ", "@bank.example", "<>"])


@st.composite
def mailbox(draw: Any) -> str:
    addr = f"{draw(local)}@{draw(domain)}"
    form = draw(st.sampled_from(["bare", "angle", "named", "named", "group"]))
    if form == "bare":
        return addr
    if form == "angle":
        return f"<{addr}>"
    if form == "group":
        return f"{draw(atom)}: {addr};"
    return f"{draw(display)} <{addr}>"


@st.composite
def from_values(draw: Any) -> str:
    parts = draw(st.lists(mailbox(), min_size=0, max_size=3))
    value = ", ".join(parts)
    for _ in range(draw(st.integers(0, 2))):  # noise at random places
        i = draw(st.integers(0, len(value)))
        value = value[:i] + draw(noise) + value[i:]
    return value


def reference(value: str) -> tuple[set[str], bool]:
    """The domains the strict reader shows, and whether every address it shows is usable."""
    try:
        addresses = REGISTRY("From", value).addresses
    except Exception:  # noqa: BLE001 - the reference gives up
        return set(), False
    usable = {a.domain.strip().rstrip(".").lower() for a in addresses
              if a.username and a.domain.strip().rstrip(".")}
    return usable, bool(addresses) and len(usable) > 0 and all(
        a.username and a.domain.strip().rstrip(".") for a in addresses)


def lax(value: str) -> tuple[set[str], bool]:
    """The domains ``email.utils.getaddresses`` shows, and whether every address is usable."""
    out, whole = set(), True
    for _, addr in email.utils.getaddresses([value]):
        local, at, dom = addr.rpartition("@")
        if not at or not local or not dom.strip().rstrip("."):
            whole = False
        else:
            out.add(dom.strip().rstrip(".").lower())
    return out, whole and bool(out)


@PROPS
@given(st.one_of(from_values(), st.text(max_size=60)))
def test_from_domains_agree_with_the_strict_reader_or_refuse(value: str) -> None:
    value = " ".join(value.split())  # as the message's header values are
    domains, why = from_domains([value])
    single, _ = from_domain([value])
    (ref, ref_whole), (loose, loose_whole) = reference(value), lax(value)
    event("no domain" if not domains else "one trusted domain" if single else
          "several or read two ways")
    # never a domain a reader shows left unchecked, never one no reader shows (a mail client
    # showing one without its invisible characters, decoded or cut at a NUL included)
    shown = set(shown_domains(value, list(ref | loose)))
    assert set(domains) == ref | loose | shown, (value, domains, ref, loose)
    assert len(domains) == len(set(domains))
    if not domains:
        assert why
    # a single trusted domain only where both readings are whole and exactly that domain
    if single is not None:
        assert ref == loose == {single} and ref_whole and loose_whole, (value, ref, loose)
        assert domains == [single] and not why
    if ref_whole and loose_whole and ref == loose and len(ref) == 1 and not shown:
        assert single is not None


@PROPS
@given(st.lists(from_values(), min_size=2, max_size=3))
def test_several_from_headers_never_yield_a_domain(values: list[str]) -> None:
    assert from_domains(values)[0] == []
