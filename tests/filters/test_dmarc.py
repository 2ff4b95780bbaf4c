"""The dmarc filter: crafted spf/dkim Results, _dmarc records served by a DNS server on loopback,
and the authheaders-derived cases of /work/shared/corpora/dmarc-authheaders."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from filters.dkim import DkimVerifyFilter
from filters.dmarc import DmarcFilter, from_domain, from_domains, org_domain, parse_record
from gateway.dnsresolver import DnsResolver
from gateway.filterapi import Action, Client, ConfigError, FilterContext, Result, Stage
from gateway.message import Message
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from tests.support import tally
from tests.support.dnsserver import DnsServer

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpora" / "dmarc-authheaders"

ZONE = "".join(f'{name}. 60 IN TXT "{value}"\n' for name, value in [
    ("_dmarc.relaxed.test", "v=DMARC1; p=reject"),
    ("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s"),
    ("_dmarc.org.test", "v=DMARC1; p=none; sp=reject; np=quarantine"),
    ("_dmarc.nosp.test", "v=DMARC1; p=quarantine"),
    ("_dmarc.pct0.test", "v=DMARC1; p=reject; pct=0"),
    ("_dmarc.pct50.test", "v=DMARC1; p=reject; pct=50"),
    ("_dmarc.quar.test", "v=DMARC1; p=quarantine"),
    ("_dmarc.example.co.uk", "v=DMARC1; p=reject; sp=quarantine"),
    ("_dmarc.bad.test", "v=DMARC1; p=none; reject"),
    ("_dmarc.badp.test", "v=DMARC1; p=bounce"),
    ("_dmarc.two.test", "v=DMARC1; p=reject"),
    ("_dmarc.two.test", "v=DMARC1; p=none"),
    ("_dmarc.other.test", "v=spf1 -all"),
]) + "a.org.test. 60 IN A 192.0.2.1\nsub.nosp.test. 60 IN A 192.0.2.1\n"


@pytest.fixture(scope="module")
def ns() -> Any:
    with DnsServer(ZONE, servfail=["_dmarc.flaky.test"]) as server:
        yield server


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def message(tmp_path: Path, data: bytes) -> Message:
    path = tmp_path / "msg"
    path.write_bytes(crlf(data))
    return Message.from_spool(path, path.stat().st_size)


def resolver(port: int) -> DnsResolver:
    return DnsResolver(DnsConfig(nameservers=(("127.0.0.1", port),), timeout_s=2.0))


def spf(result: str, domain: str) -> Result:
    return Result(data={"result": result, "domain": domain, "identity": "mailfrom"})


def dkim(*sigs: tuple[str, str]) -> Result:
    return Result(data={"signatures": [
        {"d": d, "s": "sel", "a": "rsa-sha256", "result": r, "reason": "",
         "aligned_domain": d.lower()} for r, d in sigs]})


def run(tmp_path: Path, port: int, *froms: str, spf_res: Result | None = None,
        dkim_res: Result | None = None, sample: Callable[[], float] | None = None,
        enforce: bool = True) -> Result:
    head = "".join(f"From: {f}\n" for f in froms)
    msg = message(tmp_path, f"{head}To: x@rcpt.test\nSubject: t\n\nbody\n".encode())
    results = {}
    if spf_res is not None:
        results["spf"] = spf_res
    if dkim_res is not None:
        results["dkim"] = dkim_res
    kw: dict[str, Any] = {"enforce": enforce}
    if sample is not None:
        kw["sample"] = sample
    f = DmarcFilter(resolver(port), **kw)
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.9", 1),
                        message=msg, results=results)
    return asyncio.run(f.on_message(ctx))


def sym(res: Result) -> tuple[str, tuple[str, ...]]:
    assert len(res.symbols) == 1, res.symbols
    return res.symbols[0].name, res.symbols[0].options


# -- alignment -----------------------------------------------------------------------------------
def test_relaxed_dkim_alignment_passes(tmp_path, ns):
    res = run(tmp_path, ns.port, "A <a@relaxed.test>", dkim_res=dkim(("pass", "mail.relaxed.test")))
    assert sym(res)[0] == "DMARC_PASS" and res.verdict is None
    assert res.data["dkim_aligned"] and not res.data["spf_aligned"]
    assert res.data["policy"] == "reject" and res.data["domain"] == "relaxed.test"


def test_relaxed_spf_alignment_passes(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@relaxed.test", spf_res=spf("pass", "bounce.relaxed.test"),
              dkim_res=dkim(("fail", "relaxed.test")))
    assert sym(res)[0] == "DMARC_PASS" and res.data["spf_aligned"]


def test_strict_alignment_needs_exact_domain(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@strict.test", spf_res=spf("pass", "bounce.strict.test"),
              dkim_res=dkim(("pass", "mail.strict.test")))
    assert sym(res) == ("DMARC_FAIL", ("reject", "p", "pct=100"))
    assert res.verdict is not None and res.verdict.action is Action.REJECT
    assert res.verdict.reply is not None
    assert (res.verdict.reply.code, res.verdict.reply.status) == (550, "5.7.1")
    assert "DMARC policy of strict.test rejects this message" in str(res.verdict.reply.text)
    ok = run(tmp_path, ns.port, "a@strict.test", dkim_res=dkim(("pass", "STRICT.test")))
    assert sym(ok)[0] == "DMARC_PASS"


def test_unaligned_pass_and_aligned_fail_give_fail(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@relaxed.test", spf_res=spf("pass", "other.test"),
              dkim_res=dkim(("fail", "relaxed.test"), ("pass", "other.test")))
    assert sym(res)[0] == "DMARC_FAIL"
    assert not res.data["spf_aligned"] and not res.data["dkim_aligned"]


def test_enforce_false_reports_without_verdict(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@relaxed.test", enforce=False)
    assert sym(res)[0] == "DMARC_FAIL" and res.verdict is None


# -- policy selection ----------------------------------------------------------------------------
def test_subdomain_uses_sp(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@a.org.test")
    assert sym(res) == ("DMARC_FAIL", ("reject", "sp", "pct=100"))
    assert res.data["record"] == "org" and res.verdict is not None
    assert res.verdict.action is Action.REJECT


def test_nonexistent_subdomain_uses_np(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@ghost.org.test")
    assert sym(res) == ("DMARC_FAIL", ("quarantine", "np", "pct=100"))
    assert res.verdict is not None and res.verdict.action is Action.QUARANTINE


def test_org_domain_itself_uses_p(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@org.test")
    assert sym(res) == ("DMARC_FAIL", ("none", "p", "pct=100")) and res.verdict is None


def test_subdomain_without_sp_uses_p(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@sub.nosp.test")
    assert sym(res) == ("DMARC_FAIL", ("quarantine", "p", "pct=100"))


def test_pct0_never_rejects(tmp_path, ns):
    for s in (0.0, 0.5, 0.999):
        res = run(tmp_path, ns.port, "a@pct0.test", sample=lambda s=s: s)
        assert sym(res) == ("DMARC_FAIL", ("reject", "p", "pct=0", "sampled_out"))
        # RFC 7489 §6.6.4: a sampled-out reject is applied as quarantine
        assert res.verdict is not None and res.verdict.action is Action.QUARANTINE
        assert res.data["applied"] == "quarantine"


def test_pct_sampling(tmp_path, ns):
    hit = run(tmp_path, ns.port, "a@pct50.test", sample=lambda: 0.49)
    assert hit.verdict is not None and hit.verdict.action is Action.REJECT
    miss = run(tmp_path, ns.port, "a@pct50.test", sample=lambda: 0.5)
    assert miss.verdict is not None and miss.verdict.action is Action.QUARANTINE
    q = run(tmp_path, ns.port, "a@quar.test")
    assert q.verdict is not None and q.verdict.action is Action.QUARANTINE


def test_org_domain_fallback_via_psl(tmp_path, ns):
    assert org_domain("mail.example.co.uk") == "example.co.uk"
    before = len(ns.queries)
    res = run(tmp_path, ns.port, "a@mail.example.co.uk")
    asked = [q[0] for q in ns.queries[before:] if q[1] == "TXT"]
    assert asked == ["_dmarc.mail.example.co.uk", "_dmarc.example.co.uk"]
    assert res.data["record"] == "org" and res.data["org_domain"] == "example.co.uk"
    assert sym(res) == ("DMARC_FAIL", ("quarantine", "sp", "pct=100"))
    ok = run(tmp_path, ns.port, "a@mail.example.co.uk", dkim_res=dkim(("pass", "example.co.uk")))
    assert sym(ok)[0] == "DMARC_PASS"
    # relaxed alignment never crosses a public suffix
    bad = run(tmp_path, ns.port, "a@mail.example.co.uk", dkim_res=dkim(("pass", "other.co.uk")))
    assert sym(bad)[0] == "DMARC_FAIL"


def test_no_record_is_none(tmp_path, ns):
    for frm in ("a@nothing.test", "a@other.test"):
        res = run(tmp_path, ns.port, frm)
        assert sym(res)[0] == "DMARC_NONE" and res.verdict is None


def test_two_records_is_none(tmp_path, ns):
    assert sym(run(tmp_path, ns.port, "a@two.test"))[0] == "DMARC_NONE"


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("froms", [
    ('"Just A Name"', "Another Name"),  # two From headers, no address in either
    ('"Just A Name"',),
    (),
])
def test_bad_from(tmp_path, ns, froms):
    res = run(tmp_path, ns.port, *froms, dkim_res=dkim(("pass", "relaxed.test")))
    # the headers filter scores a missing/repeated/unparsable From: here only the explanation
    assert [(s.name, s.score) for s in res.symbols] == [("DMARC_NO_FROM", 0.0)]
    assert res.verdict is None and res.data["result"] == "permerror"


@pytest.mark.parametrize("from_,dkim_pass,expected,verdict", [
    # RFC 7489 6.6.1: each author domain checked, the strictest failing policy applies
    ("a@relaxed.test, b@quar.test", "relaxed.test", ("DMARC_FAIL", "quarantine"), "quarantine"),
    ("a@quar.test, b@relaxed.test", "quar.test", ("DMARC_FAIL", "reject"), "reject"),
    ("a@relaxed.test, b@other.test", "relaxed.test", ("DMARC_PASS", None), None),
    ("a@quar.test, b@relaxed.test", "nothing.test", ("DMARC_FAIL", "reject"), "reject"),
])
def test_several_author_domains_are_each_checked(tmp_path, ns, from_, dkim_pass, expected,
                                                 verdict):
    res = run(tmp_path, ns.port, from_, dkim_res=dkim(("pass", dkim_pass)))
    names = [s.name for s in res.symbols]
    assert names == [expected[0], "DMARC_BAD_FROM"], res.symbols
    assert res.symbols[1].options[0].startswith("From names several domains: ")
    if expected[1] is not None:
        assert res.data["applied"] == expected[1]
    assert (res.verdict.action.value if res.verdict else None) == verdict


def test_same_domain_twice_in_one_from_is_fine(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@relaxed.test, b@relaxed.test",
              dkim_res=dkim(("pass", "relaxed.test")))
    assert sym(res)[0] == "DMARC_PASS"


def test_dns_temperror_never_rejects(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@flaky.test")
    assert sym(res)[0] == "DMARC_TEMPERROR" and res.verdict is None


def test_auth_temperror_without_aligned_pass_never_rejects(tmp_path, ns):
    res = run(tmp_path, ns.port, "a@relaxed.test", spf_res=spf("temperror", "relaxed.test"))
    assert sym(res)[0] == "DMARC_TEMPERROR" and res.verdict is None
    res = run(tmp_path, ns.port, "a@relaxed.test", dkim_res=dkim(("temperror", "relaxed.test")))
    assert sym(res)[0] == "DMARC_TEMPERROR" and res.verdict is None
    assert res.data["policy"] == "reject"


@pytest.mark.parametrize("frm", ["a@bad.test", "a@badp.test"])
def test_broken_record_is_permerror(tmp_path, ns, frm):
    res = run(tmp_path, ns.port, frm)
    assert sym(res)[0] == "DMARC_PERMERROR" and res.verdict is None


def test_parse_record_defaults():
    tags = parse_record("v=DMARC1;p=Reject;")
    assert (tags["p"], tags["adkim"], tags["aspf"], tags["pct"]) == ("reject", "r", "r", "100")
    for bad in ("v=DMARC1; p=none; pct=101", "v=DMARC1; adkim=x", "p=none; v=DMARC1"):
        with pytest.raises(ValueError):
            parse_record(bad)


def test_from_config():
    f = DmarcFilter.from_config({"enforce": False, "trusted_arc_sealers": ["arc.example"]},
                                Services())
    assert isinstance(f, DmarcFilter) and not f.enforce
    assert f.trusted_arc_sealers == ("arc.example",)
    with pytest.raises(ConfigError):
        DmarcFilter.from_config({"nope": 1}, Services())
    with pytest.raises(ConfigError):
        DmarcFilter.from_config({"enforce": "yes"}, Services())
    assert DmarcFilter.name == "dmarc" and DmarcFilter.requires == ("spf", "dkim")


# -- the authheaders corpus ----------------------------------------------------------------------
# Where we knowingly differ from authheaders 0.16.3: it evaluates one domain of a From header
# naming several; RFC 7489 §6.6.1 lets a receiver refuse those, and this gateway does.
DIVERGES: dict[str, str] = {}  # none: several From domains are checked per RFC 7489 6.6.1


def corpus_zone(spec: dict[str, Any]) -> str:
    lines = []
    for name, rr in spec["dns"].items():
        if rr == "NXDOMAIN":
            continue
        if rr.get("exists"):
            lines.append(f"{name}. 60 IN A 192.0.2.1")
        if "TXT" in rr:
            value = rr["TXT"]
            if value.startswith("@file "):
                value = (CORPUS / value[6:]).read_text().strip()
            chunks = " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))
            lines.append(f"{name}. 60 IN TXT {chunks or chr(34) * 2}")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not (CORPUS / "cases.yaml").is_file(), reason=f"corpus not at {CORPUS}")
def test_authheaders_corpus(tmp_path, capsys):
    spec = yaml.safe_load((CORPUS / "cases.yaml").read_text())
    for value, domain in spec["from_domain_extraction"]:
        assert from_domain([value]) == (domain, "")
    matched, failures = 0, []
    with DnsServer(corpus_zone(spec)) as server:
        for case in spec["cases"]:
            msg = message(tmp_path, (CORPUS / case["message"]).read_bytes())
            ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.9", 1),
                                message=msg)

            async def go(case: dict[str, Any], ctx: FilterContext) -> tuple[Result, Result]:
                results: dict[str, Result] = {}
                if case.get("check_dkim"):
                    results["dkim"] = await DkimVerifyFilter(resolver(server.port)).on_message(ctx)
                given = case.get("given", {})
                if "dkim" in given:
                    results["dkim"] = dkim(*[(s["result"], s["d"]) for s in given["dkim"]])
                if "spf" in given:
                    results["spf"] = spf(given["spf"]["result"], given["spf"]["domain"])
                ctx = FilterContext(stage=ctx.stage, qid=ctx.qid, client=ctx.client,
                                    message=ctx.message, results=results)
                res = await DmarcFilter(resolver(server.port)).on_message(ctx)
                return results.get("dkim", Result()), res

            dkim_res, res = asyncio.run(go(case, ctx))
            exp = case["expect"]
            if "dkim" in exp:  # DKIM verified for real by the dkim filter
                sigs = dkim_res.data["signatures"]
                assert [s["result"] for s in sigs] == [exp["dkim"]], (case["id"], sigs)
            got = {"dmarc": res.data["result"],
                   "header_from": res.data["domain"] or "none",
                   "policy": res.data["policy"]}
            want = {k: exp[k] for k in ("dmarc", "header_from", "policy") if k in exp}
            if case["id"] in DIVERGES:
                assert sym(res)[0] == DIVERGES[case["id"]], (case["id"], res)
                continue
            if {k: got[k] for k in want} == want:
                matched += 1
            else:
                failures.append((case["id"], want, got))
    suite = "DMARC cases (authheaders corpus)"
    for ok in [True] * matched + [False] * (len(spec["cases"]) - matched):
        tally.record(suite, ok)
    assert not failures, failures
    assert matched == len(spec["cases"]) - len(DIVERGES)


# -- in the pipeline -----------------------------------------------------------------------------
class Canned:
    def __init__(self, result: Result, delay: float) -> None:
        self.result, self.delay = result, delay

    async def on_message(self, ctx: FilterContext) -> Result:
        await asyncio.sleep(self.delay)
        return self.result


def test_pipeline_waits_for_spf_and_dkim(tmp_path, ns):
    from gateway.pipeline import Pipeline
    from gateway.registry import LoadedFilter

    def loaded(name: str, inst: object, requires: tuple[str, ...] = ()) -> LoadedFilter:
        return LoadedFilter(name, inst, (Stage.MESSAGE,), requires, 5, "tempfail", "test")

    msg = message(tmp_path, b"From: a@strict.test\nSubject: t\n\nbody\n")
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.9", 1), message=msg)
    p = Pipeline([loaded("dmarc", DmarcFilter(resolver(ns.port)), DmarcFilter.requires),
                  loaded("spf", Canned(spf("pass", "strict.test"), 0.05)),
                  loaded("dkim", Canned(dkim(("fail", "strict.test")), 0.1))])
    out = asyncio.run(p.run_stage(Stage.MESSAGE, ctx))
    res = out["dmarc"].result
    assert sym(res)[0] == "DMARC_PASS" and res.data["spf_aligned"] and res.verdict is None


def _arc(result: str, *sets: tuple[str, str]) -> Result:
    """An arc filter result: ``sets`` newest first as (sealer domain, AAR)."""
    return Result(data={"result": result, "sets": [
        {"i": len(sets) - n, "as_domain": d, "aar": aar} for n, (d, aar) in enumerate(sets)]})


@pytest.mark.parametrize("arc,expected", [
    (_arc("pass", ("lists.example.org", "i=1; lists.example.org; dmarc=pass")),
     "lists.example.org"),
    (_arc("pass", ("mx.lists.example.org", "i=1; x; arc=none; dmarc=pass (p=reject)")),
     "mx.lists.example.org"),  # a subdomain of a trusted sealer
    (_arc("pass", ("lists.example.org", "i=2; l; arc=pass; dmarc=fail"),
          ("fwd.example.net", "i=1; f; dmarc=pass")), None),  # untrusted older set
    (_arc("pass", ("lists.example.org", "i=2; l; arc=pass; dmarc=fail"),
          ("lists.example.org", "i=1; l; arc=none; dmarc=pass")), "lists.example.org"),
    (_arc("pass", ("evil.example", "i=2; e; dmarc=pass"),
          ("lists.example.org", "i=1; l; dmarc=pass")), None),  # newest sealer untrusted
    (_arc("fail", ("lists.example.org", "i=1; l; dmarc=pass")), None),  # chain broken
    (_arc("pass", ("lists.example.org", "i=1; l; dkim=pass (dmarc=pass)")), None),
    (_arc("pass", ("notlists.example.org.evil", "i=1; l; dmarc=pass")), None),
    (None, None),
])
def test_trusted_arc_sealer_override_rule(arc: Result | None, expected: str | None) -> None:
    f = DmarcFilter(DnsResolver(DnsConfig()), trusted_arc_sealers=("lists.example.org",))
    results = {"arc": arc} if arc is not None else {}
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.9", 1),
                        results=results)
    assert f._arc_override(ctx) == expected
    untrusting = DmarcFilter(DnsResolver(DnsConfig()))
    assert untrusting._arc_override(ctx) is None


def test_a_temperror_that_could_not_align_does_not_shield_a_reject(tmp_path, ns):
    """An SPF temperror (or an errored SPF filter) for an unrelated envelope domain is no
    reason to hold back p=reject: only a check that could have given an aligned pass is."""
    res = run(tmp_path, ns.port, "a@relaxed.test", spf_res=spf("temperror", "attacker.test"))
    assert sym(res)[0] == "DMARC_FAIL" and res.verdict is not None
    assert res.verdict.action.value == "reject"
    res = run(tmp_path, ns.port, "a@relaxed.test",
              dkim_res=dkim(("temperror", "attacker.test")))
    assert sym(res)[0] == "DMARC_FAIL" and res.verdict is not None


def test_more_than_twenty_author_domains_are_refused(tmp_path, ns):
    many = ", ".join(f"x@d{i}.test" for i in range(20)) + ", ceo@relaxed.test"
    res = run(tmp_path, ns.port, many, dkim_res=dkim(("pass", "d0.test")))
    assert sym(res)[0] == "DMARC_BAD_FROM" and res.verdict is not None
    assert res.verdict.action.value == "reject" and res.verdict.reply.code == 550
    assert run(tmp_path, ns.port, many, enforce=False).verdict is None


# -- the From read two ways (found by tests/property/test_from_props.py) ---------------------------
@pytest.mark.parametrize("from_", [
    "a@attacker.test)<b@relaxed.test>",  # getaddresses: attacker.test, '', relaxed.test
    "b@relaxed.test\\@attacker.test",  # getaddresses: nothing usable; strict: relaxed.test
    "a@attacker.test;b@relaxed.test",
])
def test_a_from_read_two_ways_checks_every_domain_either_reader_shows(tmp_path, ns, from_):
    """The old reading refused these (unusable getaddresses entry: DMARC_NO_FROM, no lookup,
    no verdict) although the strict reader shows relaxed.test (p=reject)."""
    res = run(tmp_path, ns.port, from_, dkim_res=dkim(("pass", "attacker.test")))
    names = [s.name for s in res.symbols]
    assert names == ["DMARC_FAIL", "DMARC_BAD_FROM"], res.symbols
    assert res.symbols[1].options[0].startswith("From read two ways: ")
    assert res.data["domain"] == "relaxed.test"
    assert res.verdict is not None and res.verdict.action.value == "reject"


@pytest.mark.parametrize("from_", ["a@quar.test, carol@", "Al <a@quar.test>, @x.test",
                                   "a@quar.test, x", ", a@quar.test"])
def test_one_author_domain_beside_an_unusable_part_is_evaluated_and_not_scored_again(
        tmp_path, ns, from_):
    """The unusable part is the headers filter's HEADERS_BAD_FROM: here DMARC_FROM_UNUSABLE_PART
    (0) explains it, the domain is checked and enforced (it was DMARC_BAD_FROM, scored 3 on top
    of HEADERS_BAD_FROM's 2)."""
    res = run(tmp_path, ns.port, from_, dkim_res=dkim(("pass", "attacker.test")))
    assert [(s.name, s.score) for s in res.symbols] == [
        ("DMARC_FAIL", None), ("DMARC_FROM_UNUSABLE_PART", 0.0)], res.symbols
    assert res.data["domain"] == "quar.test"
    assert res.verdict is not None and res.verdict.action.value == "quarantine"


def test_single_trusted_from_domain_only_when_both_readers_agree():
    assert from_domain(["Joe <joe@relaxed.test>"]) == ("relaxed.test", "")
    # getaddresses reads 'brelaxed.test', the strict reader 'b': no single trusted domain
    domain, why = from_domain(["x@b relaxed.test"])
    assert domain is None and why.startswith("From read two ways: ")
    assert set(from_domains(["x@b relaxed.test"])[0]) == {"brelaxed.test", "b"}


# -- a From domain a mail client shows without its invisible characters ----------------------------
@pytest.mark.parametrize("from_", ["ceo@relaxed.test\u200b", "ceo@relaxed\u00ad.test",
                                   "Boss <ceo@relaxed.\u2060test>", "ceo@relaxed.test\udca0"])
def test_a_from_domain_is_also_checked_as_shown_without_invisible_characters(
        tmp_path, ns, from_):
    """'relaxed.test' + ZERO WIDTH SPACE (or a no-break space, a word joiner, an undecodable
    byte) is shown as relaxed.test (p=reject) by a mail client; the old reading looked up
    only the domain with the character in it (none or permerror, the message relayed)."""
    domains, why = from_domains([from_])
    assert "relaxed.test" in domains and why, (domains, why)
    if "\udca0" in from_:  # a raw byte: the header as the spool gives it, not through run()
        return
    res = run(tmp_path, ns.port, from_)
    assert [s.name for s in res.symbols] == ["DMARC_FAIL", "DMARC_BAD_FROM"], res.symbols
    assert res.verdict is not None and res.verdict.action.value == "reject"


@pytest.mark.parametrize("froms", [("x@attacker.test", "ceo@relaxed.test"),
                                   ("ceo@relaxed.test", "x@attacker.test"),
                                   ("Boss <ceo@relaxed.test>", '"Just A Name"')])
def test_several_from_headers_check_every_domain_they_name(tmp_path, ns, froms):
    """A client shows one of two From headers, often the first: relaxed.test (p=reject) is
    enforced whichever it is (old code: DMARC_NO_FROM, no lookup, the message relayed with
    only the headers filter's 4 points)."""
    res = run(tmp_path, ns.port, *froms, dkim_res=dkim(("pass", "attacker.test")))
    assert [(s.name, s.score) for s in res.symbols] == [("DMARC_FAIL", None),
                                                        ("DMARC_SEVERAL_FROM", 0.0)], res.symbols
    assert res.symbols[1].options[0].startswith("2 From headers: ")
    assert res.verdict is not None and res.verdict.action.value == "reject"
    assert res.data["domain"] == "relaxed.test"


@pytest.mark.parametrize("from_", ["=?us-ascii?q?ceo=40relaxed.test?=",
                                   "=?utf-8?b?PGNlb0ByZWxheGVkLnRlc3Q+?=",  # <ceo@relaxed.test>
                                   "=?us-ascii?q?ceo=40relaxed.test?= <x@attacker.test>",
                                   "ceo@relaxed.test\x00x@attacker.test"])
def test_a_from_shown_decoded_or_cut_at_a_nul_is_checked_too(tmp_path, ns, from_):
    """A client decoding encoded words, or reading the header as a C string, shows
    ceo@relaxed.test (p=reject); the old reading found no domain or only attacker.test
    (DMARC_NO_FROM or DMARC_PASS: relayed)."""
    res = run(tmp_path, ns.port, from_, dkim_res=dkim(("pass", "attacker.test")))
    # explained as DMARC_BAD_FROM, or unscored beside the headers filter's HEADERS_BAD_FROM
    # where relaxed.test is the only domain (DMARC_FROM_UNUSABLE_PART)
    assert res.symbols[0].name == "DMARC_FAIL" and len(res.symbols) == 2, res.symbols
    assert res.symbols[1].name in ("DMARC_BAD_FROM", "DMARC_FROM_UNUSABLE_PART")
    assert "relaxed.test" in res.symbols[1].options[0], res.symbols
    assert res.verdict is not None and res.verdict.action.value == "reject"
