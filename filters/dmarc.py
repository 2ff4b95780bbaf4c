"""The ``dmarc`` filter: RFC 7489 DMARC on the RFC5322.From domain, with RFC 9091 ``np=`` (and
its PSD record fallback), using the ``spf`` and ``dkim`` filters' results (``requires``).

Steps: the From domain (no From or an unparsable one -> DMARC_NO_FROM, ``result`` permerror,
no lookup; several From headers -> every domain they name checked as below, DMARC_SEVERAL_FROM
(score 0) beside the headers filter's HEADERS_MULTIPLE_FROM, since a mail client shows one; one From header naming addresses in several domains, or
read differently by ``email.utils.getaddresses`` and the stdlib's strict reader
(``email.headerregistry``; or readable by one of them only) -> DMARC_BAD_FROM *and*, per RFC
7489 §6.6.1, each domain either reader shows checked (more than 20 → refused 550 5.7.1), the strictest
policy among those that fail applying — the result is that domain's); the policy record ``_dmarc.<from-domain>`` TXT, else the organizational domain's (Public Suffix List,
offline, via ``publicsuffixlist``), else an RFC 9091 PSD record (``_dmarc.<public-suffix>``,
used only when it says ``psd=y``); SPF alignment (the ``spf`` filter's pass ``domain``) and DKIM
alignment (any passing signature's ``d=``), relaxed = same organizational domain, strict = equal.

Symbols (exactly one, plus DMARC_BAD_FROM for several author domains): DMARC_PASS, DMARC_FAIL (options: the policy applied, which tag gave it
``p``/``sp``/``np``, ``pct=N``, and ``sampled_out`` when pct downgraded it), DMARC_NONE (no
usable record, or a record without ``p=``), DMARC_TEMPERROR (the policy lookup failed, or no
identifier aligned while an SPF check or an aligned DKIM signature had a temperror),
DMARC_PERMERROR (a broken record), DMARC_BAD_FROM, DMARC_NO_FROM, DMARC_FROM_UNUSABLE_PART,
DMARC_SEVERAL_FROM
(option: why).

One finding is scored once: a missing, repeated or unparsable From is the ``headers`` filter's
finding (HEADERS_MISSING_FROM, HEADERS_MULTIPLE_FROM, HEADERS_BAD_FROM, scored there); here it
only explains, as DMARC_NO_FROM (score 0 unless the policy gives it one — do so in a chain
without ``headers``), why DMARC was not evaluated. A From with one author domain beside a part
neither reader can use (``bob@x.test, carol@``: HEADERS_BAD_FROM) has that domain evaluated
and the rest explained as DMARC_FROM_UNUSABLE_PART (score 0 likewise). DMARC_BAD_FROM
(several author domains in one From, RFC 7489 §6.6.1, or two readings that differ) is this
filter's own finding.

Verdict (``enforce = true``, the default): a fail whose effective policy is ``reject`` gives
REJECT ``550 5.7.1 DMARC policy of <domain> rejects this message``; ``quarantine`` gives
QUARANTINE. ``pct`` sampling follows RFC 7489 §6.6.4: a sampled-out message gets the next less
strict policy (reject -> quarantine, quarantine -> none), so ``pct=0`` never rejects. A
temperror never gives a verdict; BAD_FROM is left to the policy (score the symbol).

``data``: ``result``, ``domain`` (the From domain), ``policy`` (the published policy that
applies: p/sp/np, before pct), ``spf_aligned``, ``dkim_aligned``, plus ``org_domain``,
``record`` (``domain``/``org``/``psd``/None) and ``reason`` — for Authentication-Results.

Trusted ARC sealers (RFC 8617 §7.2.1, a local-policy override for forwarders and mailing lists
that break SPF and DKIM): when DMARC fails, the ``arc`` filter's chain validated (``pass``), and
the newest ARC sets were sealed by domains in ``trusted_arc_sealers`` (a sealer matches a listed
domain or a subdomain of it) of which one recorded ``dmarc=pass`` in its
ARC-Authentication-Results, the failure is not enforced: the result stays ``fail`` (the
options gain ``arc_override=<sealer>``, ``data["arc_override"]`` names it, a
DMARC_ARC_OVERRIDE symbol is added, the A-R header notes it), no verdict. Only the run of
trusted sealers at the newest end of the chain counts: a hop after an untrusted sealer could
have changed the message that a trusted one vouched for.

Settings: ``enforce`` (bool, default true), ``trusted_arc_sealers`` (list of domains).
"""

from __future__ import annotations

import functools
import random
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from filters._psl import suffix_list
from filters.arc import aar_result
from gateway import mime
from gateway.dnsresolver import DnsAnswer, DnsResolver, Resolver
from gateway.filterapi import (
    Action,
    ConfigError,
    Filter,
    FilterContext,
    Result,
    Symbol,
    Verdict,
)
from gateway.headeraddr import addresses, strict_domains, unusable_from, usable_mailbox
from gateway.policy.schema import DnsConfig
from gateway.replies import Reply
from gateway.services import Services
from gateway.settings import boolean, check_keys, str_list

PASS, FAIL, NONE, TEMPERROR, PERMERROR = "pass", "fail", "none", "temperror", "permerror"
SYMBOLS = {PASS: "DMARC_PASS", FAIL: "DMARC_FAIL", NONE: "DMARC_NONE",
           TEMPERROR: "DMARC_TEMPERROR", PERMERROR: "DMARC_PERMERROR"}
BAD_FROM = "DMARC_BAD_FROM"
NO_FROM = "DMARC_NO_FROM"  # no single usable From: the headers filter scores that finding
# one author domain, evaluated, beside a part no reader can use: HEADERS_BAD_FROM scores that
UNUSABLE_PART = "DMARC_FROM_UNUSABLE_PART"
# several From headers, every domain checked: the headers filter's HEADERS_MULTIPLE_FROM scores
# the finding, this only explains it (score 0, a symbol of its own so [scores] for
# DMARC_BAD_FROM does not count it again)
SEVERAL_FROM = "DMARC_SEVERAL_FROM"
MAX_FROM_DOMAINS = 20  # author domains checked in one From; more is refused outright
MAX_DECODED = 4096  # characters: longer From values are not RFC 2047-decoded
ARC_OVERRIDE = "DMARC_ARC_OVERRIDE"
SETTINGS = {"enforce", "trusted_arc_sealers"}
POLICIES = ("none", "quarantine", "reject")
_DOWNGRADE = {"reject": "quarantine", "quarantine": "none", "none": "none"}

@functools.lru_cache(maxsize=1024)
def org_domain(domain: str) -> str:
    """The RFC 7489 §3.2 organizational domain (the domain itself if it is a public suffix)."""
    return suffix_list().privatesuffix(domain) or domain


@functools.lru_cache(maxsize=1024)
def public_suffix(domain: str) -> str | None:
    return suffix_list().publicsuffix(domain)


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = _norm(a), _norm(b)
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


def _norm(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class Outcome:
    """Policy discovery ended without a usable record: the DMARC result and why."""

    result: str
    reason: str


class RecordError(ValueError):
    pass


def parse_record(text: str) -> dict[str, str]:
    """Tags of a DMARC record (starting ``v=DMARC1``); RecordError on a syntax error."""
    tags: dict[str, str] = {}
    for i, part in enumerate(p.strip() for p in text.split(";")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not eq or not name:
            raise RecordError(f"missing tag or value: {text!r}")
        if i == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError(f"not v=DMARC1 first: {text!r}")
        tags.setdefault(name, value)
    for key in ("p", "sp", "np"):
        if key in tags and tags[key].lower() not in POLICIES:
            raise RecordError(f"bad {key}={tags[key]}")
        if key in tags:
            tags[key] = tags[key].lower()
    for key in ("adkim", "aspf"):
        v = tags.setdefault(key, "r").lower()
        if v not in ("r", "s"):
            raise RecordError(f"bad {key}={tags[key]}")
        tags[key] = v
    pct = tags.setdefault("pct", "100")
    if not pct.isdigit() or not 0 <= int(pct) <= 100:
        raise RecordError(f"bad pct={pct}")
    return tags


def from_domain(values: list[str]) -> tuple[str | None, str]:
    """The one RFC5322.From domain, or (None, why not): only when both readings agree on it."""
    domains, why = from_domains(values)
    return (domains[0], "") if len(domains) == 1 and not why else (None, why)


def from_domains(values: list[str]) -> tuple[list[str], str]:
    """The RFC5322.From domains in order (one From header, every address with a domain), and
    why they are not exactly one trusted domain (``[]`` when there is no usable From at all).

    The value is read twice: by ``email.utils.getaddresses`` and by the standard library's
    strict reader (``email.headerregistry``). Where the two disagree, or one of them cannot
    read it, the domains either shows are returned together with a reason — never a single
    trusted domain, and never one a reader shows left unchecked."""
    if not values:
        return [], "no From header"
    if len(values) > 1:
        return [], f"{len(values)} From headers"
    value = " ".join(values[0].split())
    lax, lax_whole, strict, strict_whole = _read(value)
    domains = list(dict.fromkeys([*lax, *strict]))
    shown = shown_domains(value, domains)
    if not domains and not shown:
        return [], f"Unable to extract From domain: {values[0].strip()}"
    if shown:  # a mail client shows these: checked too, the strictest failing policy applies
        return [*domains, *shown], (f"From shown as {', '.join(shown)} (invisible characters "
                                    "or undecodable bytes left out, encoded words decoded, or "
                                    "cut at a NUL)")
    if not (lax_whole and strict_whole) or set(lax) != set(strict):
        return domains, (f"From read two ways: {', '.join(lax) or 'nothing'}"
                         f"{'' if lax_whole else ' and unusable text'} (getaddresses) vs "
                         f"{', '.join(strict) or 'nothing'}"
                         f"{'' if strict_whole else ' and unusable text'} (strict)")
    if len(domains) > 1:
        return domains, f"From names several domains: {', '.join(domains)}"
    return domains, ""


def _read(value: str) -> tuple[list[str], bool, tuple[str, ...], bool]:
    """The domains ``getaddresses`` shows and whether its reading is whole, then the strict
    reader's."""
    lax: list[str] = []
    lax_whole = True
    for _, addr in addresses(value):
        local, at, dom = addr.rpartition("@")
        dom = _norm(dom)
        if not at or not local or not dom:
            lax_whole = False
        elif dom not in lax:
            lax.append(dom)
    strict, strict_whole = strict_domains(value)
    return lax, lax_whole, strict, strict_whole


def shown_domains(value: str, domains: list[str]) -> list[str]:
    """Domains a mail client may show for a From ``value`` that neither reader shows (not in
    ``domains``): each domain without invisible characters or undecodable bytes, and the
    domains of the value RFC 2047-decoded (``=?us-ascii?q?ceo=40bank.example?=``) or cut at
    a NUL, as a C string reads it."""
    out = [s for s in map(_shown, domains) if s and s not in domains]
    others = [value.split("\x00", 1)[0]] if "\x00" in value else []
    if len(value) <= MAX_DECODED:
        decoded = mime.decode_header(value)  # undecodable words: shown as they are
        if decoded != value:
            others.append(decoded)
    for other in others:
        lax, _, strict, _ = _read(other)
        for d in (*lax, *strict, *map(_shown, (*lax, *strict))):
            if d and d not in domains and d not in out:
                out.append(d)
    return out


def _shown(domain: str) -> str:
    """A domain as a mail client shows it: without invisible characters (format, control,
    unassigned, private use), spaces or undecodable bytes (surrogate escapes)."""
    return _norm("".join(ch for ch in domain if unicodedata.category(ch) not in _INVISIBLE))


_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))


def _junk_beside(value: str) -> bool:
    """The From's one author domain stands beside text that is the headers filter's
    HEADERS_BAD_FROM (``bob@x.test, carol@``; ``, bob@x.test``), not beside a reading that
    differs: where the strict reader reads the whole value, getaddresses must show the domain
    too (``bob@x.test carol@y.test``: it shows nothing usable, a parser differential, so
    DMARC_BAD_FROM)."""
    if not unusable_from(value):
        return False
    collapsed = " ".join(value.split())
    strict, whole = strict_domains(collapsed)
    return not whole or (bool(strict) and any(usable_mailbox(a) for _, a in addresses(collapsed)))


class DmarcFilter(Filter):
    name = "dmarc"
    requires = ("spf", "dkim")
    after = ("arc",)

    def __init__(self, resolver: DnsResolver, *, enforce: bool = True,
                 trusted_arc_sealers: tuple[str, ...] = (),
                 sample: Callable[[], float] = random.random) -> None:
        self.resolver = resolver
        self.enforce = enforce
        self.trusted_arc_sealers = trusted_arc_sealers
        self.sample = sample  # in [0, 1): the message is in the pct sample if < pct/100

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> DmarcFilter:
        check_keys(cfg, SETTINGS)
        resolver = getattr(services, "resolver", None) or DnsResolver(DnsConfig())
        sealers = str_list(cfg, "trusted_arc_sealers")
        if any(not s.strip() for s in sealers):
            raise ConfigError("trusted_arc_sealers", "must be domain names")
        return cls(resolver, enforce=boolean(cfg, "enforce", True),
                   trusted_arc_sealers=tuple(_norm(s) for s in sealers))

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        froms = msg.get_all("From")
        if len(froms) > 1:
            return await self._several_headers(ctx, froms)
        domains, why = from_domains(froms)
        if not domains:
            return Result(symbols=(Symbol(NO_FROM, (why,), 0.0),),
                          data=_data(PERMERROR, None, "none", reason=why))
        if len(domains) == 1 and not why:
            return await self._evaluate(ctx, domains[0])
        if len(domains) == 1 and _junk_beside(froms[0]):
            # one author domain, checked as usual; the unusable rest is the headers filter's
            # finding (HEADERS_BAD_FROM): explained here, not scored twice
            result = await self._evaluate(ctx, domains[0])
            return replace(result, symbols=(*result.symbols, Symbol(UNUSABLE_PART, (why,), 0.0)))
        # RFC 7489 §6.6.1: several author domains in one From: check each, and the strictest
        # policy among those that fail applies; DMARC_BAD_FROM says so, for the policy to weigh
        if len(domains) > MAX_FROM_DOMAINS:  # no real mail has this; never leave one unchecked
            why = f"From names {len(domains)} domains (more than {MAX_FROM_DOMAINS})"
            verdict = Verdict(Action.REJECT, Reply(550, "5.7.1", "Too many author domains in "
                                                   "From"), reason=why) if self.enforce else None
            return Result(symbols=(Symbol(BAD_FROM, (why,)),), verdict=verdict,
                          data=_data(PERMERROR, None, "none", reason=why))
        checked = [await self._evaluate(ctx, d) for d in domains]
        worst = min(checked, key=_severity)
        return Result(symbols=(*worst.symbols, Symbol(BAD_FROM, (why,))),
                      verdict=worst.verdict, data=worst.data)

    async def _several_headers(self, ctx: FilterContext, froms: list[str]) -> Result:
        """Several From headers (a mail client shows one of them, often the first): every
        domain any of them names is checked, the strictest failing policy applies, as for
        several domains in one From. DMARC_SEVERAL_FROM explains it with score 0: the
        headers filter's HEADERS_MULTIPLE_FROM scores the finding."""
        why = f"{len(froms)} From headers"
        domains = list(dict.fromkeys(d for v in froms for d in from_domains([v])[0]))
        if not domains:
            return Result(symbols=(Symbol(NO_FROM, (why,), 0.0),),
                          data=_data(PERMERROR, None, "none", reason=why))
        if len(domains) > MAX_FROM_DOMAINS:
            why = f"{why} name {len(domains)} domains (more than {MAX_FROM_DOMAINS})"
            verdict = Verdict(Action.REJECT, Reply(550, "5.7.1", "Too many author domains in "
                                                   "From"), reason=why) if self.enforce else None
            return Result(symbols=(Symbol(SEVERAL_FROM, (why,), 0.0),), verdict=verdict,
                          data=_data(PERMERROR, None, "none", reason=why))
        checked = [await self._evaluate(ctx, d) for d in domains]
        worst = min(checked, key=_severity)
        why = f"{why}: {', '.join(domains)} each checked"
        return Result(symbols=(*worst.symbols, Symbol(SEVERAL_FROM, (why,), 0.0)),
                      verdict=worst.verdict, data=worst.data)

    async def _evaluate(self, ctx: FilterContext, domain: str) -> Result:
        """DMARC for one author domain."""
        org = org_domain(domain)
        # Not the per-message budget: DMARC's own lookups are few and bounded (at most 4 per
        # author domain), and a sender's SPF record must not be able to use them up.
        dns: Resolver = self.resolver
        found = await self._discover(dns, domain, org)
        if isinstance(found, Outcome):  # no record, or an error
            result, reason = found.result, found.reason
            return Result(symbols=(Symbol(SYMBOLS[result], (reason,) if reason else ()),),
                          data=_data(result, domain, "none", org=org, reason=reason))
        tags, source = found
        if "p" not in tags:  # RFC 7489 §6.6.3: no usable policy -> DMARC does not apply
            return Result(symbols=(Symbol(SYMBOLS[NONE], ("record without p=",)),),
                          data=_data(NONE, domain, "none", org=org, record=source,
                                     reason="record without p="))
        policy, tag = await self._policy(dns, tags, source, domain, org)

        spf_aligned, spf_temp = _spf(ctx, domain, tags["aspf"])
        dkim_aligned, dkim_temp = _dkim(ctx, domain, tags["adkim"])
        base: dict[str, Any] = dict(org=org, record=source, spf_aligned=spf_aligned,
                                    dkim_aligned=dkim_aligned)
        if spf_aligned or dkim_aligned:
            return Result(symbols=(Symbol(SYMBOLS[PASS]),),
                          data=_data(PASS, domain, policy, **base))
        if spf_temp or dkim_temp:
            reason = "no aligned pass; " + ("SPF" if spf_temp else "DKIM") + " temperror"
            return Result(symbols=(Symbol(SYMBOLS[TEMPERROR], (reason,)),),
                          data=_data(TEMPERROR, domain, policy, reason=reason, **base))
        pct = int(tags["pct"])
        applied = policy
        options = [policy, tag, f"pct={pct}"]
        if pct < 100 and not self.sample() * 100 < pct:
            applied = _DOWNGRADE[policy]
            options.append("sampled_out")
        verdict = None
        symbols = [Symbol(SYMBOLS[FAIL], tuple(options))]
        override = self._arc_override(ctx)
        if override:
            options.append(f"arc_override={override}")
            symbols = [Symbol(SYMBOLS[FAIL], tuple(options)), Symbol(ARC_OVERRIDE, (override,))]
            base["arc_override"] = override
            applied = "none"
        if self.enforce and applied == "reject":
            verdict = Verdict(Action.REJECT,
                              Reply(550, "5.7.1", f"DMARC policy of {domain} rejects this message"),
                              reason=f"DMARC {tag}=reject")
        elif self.enforce and applied == "quarantine":
            verdict = Verdict(Action.QUARANTINE, reason=f"DMARC {tag}=quarantine")
        return Result(symbols=tuple(symbols), verdict=verdict,
                      data=_data(FAIL, domain, policy, applied=applied, **base))

    def _arc_override(self, ctx: FilterContext) -> str | None:
        """The trusted sealer whose validated ARC set vouches for DMARC, or None."""
        arc = ctx.results.get("arc")
        if not self.trusted_arc_sealers or arc is None or arc.data.get("result") != PASS:
            return None
        for s in arc.data.get("sets") or ():  # newest first
            sealer = str(s.get("as_domain") or "").lower()
            if not any(sealer == t or sealer.endswith("." + t) for t in self.trusted_arc_sealers):
                return None
            if aar_result(str(s.get("aar") or ""), "dmarc") == PASS:
                return sealer
        return None

    async def _discover(self, dns: Resolver, domain: str, org: str
                        ) -> tuple[dict[str, str], str] | Outcome:
        """RFC 7489 §6.6.3 (+ RFC 9091 §4): the record and where it came from, or an outcome."""
        candidates = [(domain, "domain")]
        if org != domain:
            candidates.append((org, "org"))
        suffix = public_suffix(domain)
        if suffix and suffix not in (domain, org):
            candidates.append((suffix, "psd"))
        for name, source in candidates:
            got = await self._record(dns, name)
            if got is None:
                continue
            if isinstance(got, Outcome):
                return got
            if source == "psd" and got.get("psd", "").lower() != "y":
                continue
            return got, source
        return Outcome(NONE, "no DMARC record")

    async def _record(self, dns: Resolver, name: str) -> dict[str, str] | Outcome | None:
        ans = await dns.query(f"_dmarc.{name}", "TXT")
        if ans.status == "temperror":
            return Outcome(TEMPERROR, f"_dmarc.{name}: {ans.error}")
        if ans.status == "permerror":
            return Outcome(PERMERROR, f"_dmarc.{name}: {ans.error}")
        records = [t for t in _texts(ans) if t.startswith("v=DMARC1")
                   and t[8:].lstrip()[:1] in ("", ";")]
        if len(records) != 1:  # none, or several: DMARC does not apply (§6.6.3 step 5)
            return None
        try:
            return parse_record(records[0])
        except RecordError as e:
            return Outcome(PERMERROR, str(e))

    async def _policy(self, dns: Resolver, tags: dict[str, str], source: str, domain: str,
                      org: str
                      ) -> tuple[str, str]:
        """The policy for ``domain`` and the tag it came from (p, sp or np)."""
        if source == "domain" or (source == "psd" and domain == org):
            return tags["p"], "p"
        if "np" in tags and await self._nonexistent(dns, domain):
            return tags["np"], "np"
        if "sp" in tags:
            return tags["sp"], "sp"
        return tags["p"], "p"

    async def _nonexistent(self, dns: Resolver, domain: str) -> bool:
        """RFC 9091 §2.1: NXDOMAIN for the name (type-independent, so one A query suffices)."""
        ans = await dns.query(domain, "A")
        return ans.status == "nxdomain"


def _texts(ans: DnsAnswer) -> list[str]:
    if not ans.ok:
        return []
    out = []
    for rd in ans.records:
        strings = getattr(rd, "strings", None)
        if strings is not None:
            out.append(b"".join(strings).decode("utf-8", "replace"))
    return out


def _spf(ctx: FilterContext, domain: str, mode: str) -> tuple[bool, bool]:
    res = ctx.results.get("spf")
    data = res.data if res is not None else {}
    result = data.get("result")
    # The filter ran but gave no result (SPF_ERROR: it raised or timed out, on_error =
    # "continue"): SPF was not evaluated, which is a temperror, never grounds for a reject.
    errored = res is not None and "result" not in data
    spf_domain = data.get("domain") or _envelope_domain(ctx)
    # A temperror only holds DMARC back when that SPF check could have given an *aligned*
    # pass: otherwise a sender could dodge p=reject with a broken SPF record of its own domain.
    could_align = aligned(spf_domain, domain, mode)
    return (result == "pass" and could_align), (result == "temperror" or errored) and could_align


def _envelope_domain(ctx: FilterContext) -> str:
    """The domain SPF checks: MAIL FROM's, or the HELO name for the null sender."""
    sender = ctx.sender
    if sender is not None and not sender.is_null and not sender.literal:
        return sender.domain_key
    return (ctx.client.helo or "").strip().rstrip(".")


def _dkim(ctx: FilterContext, domain: str, mode: str) -> tuple[bool, bool]:
    res = ctx.results.get("dkim")
    sigs = res.data.get("signatures", []) if res is not None else []
    ok = False
    temp = res is not None and "signatures" not in res.data  # DKIM_ERROR: not evaluated
    for sig in sigs:
        d = sig.get("aligned_domain") or sig.get("d") or ""
        if not aligned(d, domain, mode):
            continue
        ok = ok or sig.get("result") == "pass"
        temp = temp or sig.get("result") == "temperror"
    return ok, temp


_RANK = {FAIL: 0, TEMPERROR: 1, PERMERROR: 2, PASS: 3, NONE: 4}
_POLICY_RANK = {"reject": 0, "quarantine": 1, "none": 2}


def _severity(r: Result) -> tuple[int, int]:
    """Order of the results of several author domains: a fail with the strictest applied
    policy first, then temperror, permerror, pass, none."""
    return (_RANK.get(r.data.get("result", NONE), 5),
            _POLICY_RANK.get(r.data.get("applied") or "none", 2))


def _data(result: str, domain: str | None, policy: str, *, spf_aligned: bool = False,
          dkim_aligned: bool = False, org: str | None = None, record: str | None = None,
          reason: str = "", applied: str | None = None, arc_override: str | None = None
          ) -> dict[str, Any]:
    return {"result": result, "domain": domain, "policy": policy, "spf_aligned": spf_aligned,
            "dkim_aligned": dkim_aligned, "org_domain": org, "record": record,
            "applied": applied, "reason": reason, "arc_override": arc_override}
