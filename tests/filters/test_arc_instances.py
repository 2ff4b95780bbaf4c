"""The arc filter reads ARC instances and key names as dkimpy's verify reads them (found by
tests/property/test_taglist_props.py): its own ``i=`` regex once read ``I=60`` where dkimpy
reads ``i=1`` (inside ``xi=1``), and answered ``policy`` (over max_instances) for a chain that
dkimpy fails."""

from __future__ import annotations

import asyncio

import dkim

from filters.arc import ArcFilter, chain_keys
from gateway.dnsresolver import DnsAnswer

MESSAGE = (b"ARC-Seal: xi=1; I=60; cv=none; a=rsa-sha256; d=a.example; s=sel; b=AAAA\r\n"
           b"ARC-Message-Signature: i=1; a=rsa-sha256; d=a.example; s=sel; h=from; bh=AAAA;"
           b" b=AAAA\r\n"
           b"ARC-Authentication-Results: i=1; a.example; none\r\n"
           b"From: a@a.example\r\n\r\nbody\r\n")


def test_instances_are_read_as_dkimpy_reads_them() -> None:
    arc = dkim.ARC(MESSAGE)
    assert chain_keys(arc) == (arc.sorted_arc_headers()[0], {"sel._domainkey.a.example"})
    assert chain_keys(arc)[0] == 1
    cv, _, _ = dkim.ARC(MESSAGE).verify(dnsfunc=lambda *a, **k: None)
    assert cv == dkim.CV_Fail


def test_chain_status_follows_dkimpy_not_a_regex_of_its_own() -> None:
    chain = asyncio.run(ArcFilter(_NoDns()).validate(MESSAGE))  # type: ignore[arg-type]
    assert chain.result == "fail"  # was "policy": 60 ARC sets, over max_instances (50)


class _NoDns:
    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        return DnsAnswer(name, rdtype, "nxdomain")
