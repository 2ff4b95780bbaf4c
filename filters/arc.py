"""The ``arc`` filter: ARC (RFC 8617) chain validation of incoming mail, and — when ``seal_*``
is configured — an ARC set sealed with the gateway's own key on mail it relays, after its
Authentication-Results. Both with dkimpy; keys are fetched through the gateway's async
resolver first (see :mod:`filters._dkimkeys`), then dkimpy runs in a worker thread.

Symbols (exactly one): ARC_PASS (options: the sealers, newest first, ``i=N d=domain``),
ARC_FAIL (option: why), ARC_NONE (no ARC headers), ARC_TEMPERROR (the chain did not validate
and a key lookup timed out or failed temporarily: not a verdict on the chain), ARC_POLICY (not
checked by our limits: larger than ``max_bytes`` or more than ``max_instances`` sets).

A chain whose newest ARC-Seal already says ``cv=fail`` is reported as **fail** (RFC 8617 §5.2
step 2; the ValiMail suite's reference validator gives no status for its three such cases).

``data``: ``result`` (pass/fail/none/temperror/policy), ``reason``, ``sets`` (newest first:
``{"i", "as_domain", "ams_domain", "cv", "as_valid", "ams_valid", "aar"}``) — used by the
``dmarc`` filter's trusted-sealer override and by ``authres`` (``arc=`` in the header).

Sealing (``on_sign``, after the decision, relayed mail only): dkimpy builds the
ARC-Authentication-Results from the Authentication-Results headers that carry
``authserv_id`` (the ``authres`` filter's; both default to the gateway hostname, and they
must match), takes ``cv`` from its ``arc=`` result, and signs with ``seal_domain``,
``seal_selector`` and ``seal_key_file`` (an RSA private key, PEM), rsa-sha256,
relaxed/relaxed — and only when the ``authres`` filter with the same authserv-id ran for the
message (it removes forged Authentication-Results carrying our authserv-id; without it a seal
could vouch for a sender's forgeries); ``seal_headers`` lists what the ARC-Message-Signature covers (default:
dkimpy's list of the usual headers present, From over-signed).
Mail whose own chain check was a temperror or was skipped by policy is not sealed (a seal
would say ``cv=fail`` for good); that is logged.

The sealer (``_Arc``) follows dkimpy's ``ARC.sign`` over dkimpy's internals (``gen_header``,
``sorted_arc_headers``, ...); before first use it seals a known message and must give dkimpy's
own seal byte for byte, which dkimpy then validates (patch ``dkimpy.arc-sealer``,
gateway/patches.py). Otherwise dkimpy's ``ARC.sign`` seals (its AAR drops A-R comments), with
one warning line.

Settings: ``dns_timeout_s`` (5), ``max_bytes`` (10 MiB), ``max_instances`` (50, RFC 8617's
cap), ``min_rsa_bits`` (1024), ``authserv_id``, ``seal_domain``, ``seal_selector``,
``seal_key_file``, ``seal_headers``.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS, UnparsableKeyError, parse_pem_private_key
from dkim.util import InvalidTagValueList, parse_tag_value

from filters import _arheader
from filters._dkimkeys import dnsfunc, prefetch, temperrors
from filters._dkimvectors import AR_MESSAGE, KEY_NAME, KEY_RECORD, PRIVATE_KEY
from gateway import patches
from gateway.dnsresolver import DnsResolver, Resolver, per_message
from gateway.filterapi import AddHeader, ConfigError, Filter, FilterContext, Result, Symbol
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from gateway.settings import check_keys, integer, opt_str, positive, str_list

log = logging.getLogger("mailgate.filter.arc")

PASS, FAIL, NONE, TEMPERROR, POLICY = "pass", "fail", "none", "temperror", "policy"
SYMBOLS = {PASS: "ARC_PASS", FAIL: "ARC_FAIL", NONE: "ARC_NONE", TEMPERROR: "ARC_TEMPERROR",
           POLICY: "ARC_POLICY"}
SEAL_KEYS = ("seal_domain", "seal_selector", "seal_key_file")
SETTINGS = {"dns_timeout_s", "max_bytes", "max_instances", "min_rsa_bits", "authserv_id",
            "seal_headers", *SEAL_KEYS}
_ARC_SIGS = (b"arc-seal", b"arc-message-signature")
_NEVER_SIGN = {"authentication-results", "arc-seal", "arc-message-signature",
               "arc-authentication-results", "received", "return-path"}


@dataclass(frozen=True, slots=True)
class Chain:
    """What the validation found."""

    result: str
    reason: str = ""
    sets: tuple[Mapping[str, Any], ...] = ()

    def as_result(self) -> Result:
        if self.result == PASS:
            options = tuple(f"i={s['i']} d={s['as_domain']}" for s in self.sets)
        else:
            options = (self.reason,) if self.reason else ()
        return Result(symbols=(Symbol(SYMBOLS[self.result], options),),
                      data={"result": self.result, "reason": self.reason,
                            "sets": [dict(s) for s in self.sets]})


@dataclass(frozen=True, slots=True)
class Sealer:
    domain: str
    selector: str
    key: bytes  # PEM
    headers: tuple[str, ...] | None  # None: dkimpy's default list


class ArcFilter(Filter):
    name = "arc"

    def __init__(self, resolver: DnsResolver, *, authserv_id: str = "mailgate.localdomain",
                 sealer: Sealer | None = None, dns_timeout_s: float = 5.0,
                 max_bytes: int = 10 * 1024 * 1024, max_instances: int = 50,
                 min_rsa_bits: int = 1024) -> None:
        self.resolver = resolver
        self.authserv_id = authserv_id
        self.sealer = sealer
        self.dns_timeout_s = dns_timeout_s
        self.max_bytes = max_bytes
        self.max_instances = max_instances
        self.min_rsa_bits = min_rsa_bits
        if sealer is None:  # no signing hook at all: the engine skips the step
            self.on_sign = None  # type: ignore[assignment]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> ArcFilter:
        check_keys(cfg, SETTINGS)
        resolver = getattr(services, "resolver", None) or DnsResolver(DnsConfig())
        return cls(resolver,
                   authserv_id=opt_str(cfg, "authserv_id") or services.hostname,
                   sealer=_sealer(cfg, services.path),
                   dns_timeout_s=positive(cfg, "dns_timeout_s", 5.0),
                   max_bytes=integer(cfg, "max_bytes", 10 * 1024 * 1024, 1),
                   max_instances=integer(cfg, "max_instances", 50, 1),
                   min_rsa_bits=integer(cfg, "min_rsa_bits", 1024, 512))

    # -- validation -------------------------------------------------------------------------
    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        if not any(h.name.lower().encode() in (*_ARC_SIGS, b"arc-authentication-results")
                   for h in msg.headers):
            return Chain(NONE).as_result()
        if msg.size > self.max_bytes:
            return Chain(POLICY, f"message of {msg.size} bytes is over max_bytes "
                                 f"({self.max_bytes})").as_result()
        raw = await asyncio.to_thread(msg.path.read_bytes)
        return (await self.validate(raw, per_message(ctx.dns, self.resolver))).as_result()

    async def validate(self, raw: bytes, resolver: Resolver | None = None) -> Chain:
        """The chain validation status of a whole message (RFC 8617 §5.2)."""
        try:
            arc = await asyncio.to_thread(dkim.ARC, raw, minkey=self.min_rsa_bits)
        except dkim.DKIMException as e:
            return Chain(FAIL, f"unparsable message: {str(e)[:200]}")
        try:
            top, names = chain_keys(arc)
        except Exception as e:  # dkimpy on hostile input
            return Chain(FAIL, f"unreadable ARC headers: {type(e).__name__}: {str(e)[:200]}")
        if top > self.max_instances:
            return Chain(POLICY, f"{top} ARC sets, over max_instances ({self.max_instances})")
        served = await prefetch(resolver or self.resolver, names, self.dns_timeout_s)
        try:
            cv, sets, reason = await asyncio.to_thread(arc.verify, dnsfunc(served))
        except Exception as e:  # dkimpy on hostile input
            cv, sets, reason = dkim.CV_Fail, [], f"{type(e).__name__}: {str(e)[:200]}"
        result = {dkim.CV_Pass: PASS, dkim.CV_None: NONE}.get(cv, FAIL)
        if result == FAIL and (late := temperrors(served)):
            return Chain(TEMPERROR, f"key lookup failed for {', '.join(late)}",
                         tuple(_set(s) for s in sets))
        return Chain(result, str(reason) if result != PASS else "",
                     tuple(_set(s) for s in sets))

    # -- sealing ----------------------------------------------------------------------------
    async def on_sign(self, ctx: FilterContext, header_block: bytes) -> tuple[AddHeader, ...]:
        assert self.sealer is not None and ctx.message is not None
        ar = ctx.results.get("authres")
        if ar is None or str(ar.data.get("authserv_id", "")).lower() != \
                self.authserv_id.lower():
            # Without our authres run (it removes forged Authentication-Results carrying our
            # authserv-id), a seal could vouch for a sender's forged results: never seal then.
            log.warning("not ARC-sealed (qid %s): the authres filter with authserv-id %s did "
                        "not run for this message", ctx.qid, self.authserv_id)
            return ()
        own = ctx.results.get(self.name)
        result = own.data.get("result") if own is not None else None
        if result in (TEMPERROR, POLICY) or result is None:
            log.warning("not ARC-sealed (qid %s): own chain check was %s", ctx.qid,
                        result or "not run")
            return ()
        msg = ctx.message
        if msg.size > self.max_bytes:
            log.warning("not ARC-sealed (qid %s): over max_bytes", ctx.qid)
            return ()

        def build() -> list[tuple[str, str]]:
            with msg.path.open("rb") as f:
                f.seek(msg.body_offset)
                body = f.read()
            return seal(header_block + b"\r\n" + body, self.sealer, self.authserv_id)  # type: ignore[arg-type]

        fields = await asyncio.to_thread(build)
        if not fields:
            log.warning("not ARC-sealed (qid %s): no Authentication-Results from %s, or "
                        "the chain had ended", ctx.qid, self.authserv_id)
        return tuple(AddHeader(n, v) for n, v in fields)


def chain_keys(arc: dkim.ARC) -> tuple[int, set[str]]:
    """The chain's highest instance and the key names of its ARC-Seal and
    ARC-Message-Signature headers, read as dkimpy's ``verify`` reads them: its own instance
    reading (``sorted_arc_headers``, relaxed header values) and ``parse_tag_value``."""
    top, headers = arc.sorted_arc_headers()
    names: set[str] = set()
    for _, (name, value) in headers:
        if name.lower() not in _ARC_SIGS:
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList:
            continue  # dkimpy fails the set
        d, s = tags.get(b"d", b""), tags.get(b"s", b"")
        if d and s:
            names.add(f"{s.decode('ascii', 'replace')}._domainkey."
                      f"{d.decode('ascii', 'replace')}".lower().rstrip("."))
    return top, names


def seal(raw: bytes, sealer: Sealer, authserv_id: str, *, timestamp: int | None = None,
         standardize: bool = False) -> list[tuple[str, str]]:
    """The new ARC set for ``raw`` as (name, value) pairs, ARC-Seal first; empty when there
    is nothing to seal (no Authentication-Results of ``authserv_id``, or a chain that ended)."""
    arc = _Arc(raw) if ARC_SIGNER else dkim.ARC(raw)
    headers = None if sealer.headers is None else [h.encode() for h in sealer.headers]
    lines = arc.sign(sealer.selector.encode(), sealer.domain.encode(), sealer.key,
                     authserv_id.encode(), include_headers=headers, timestamp=timestamp,
                     standardize=standardize)
    out = []
    for line in lines:
        name, _, value = line.decode("utf-8", "replace").partition(":")
        out.append((name, value))
    return out


def consolidate(headers: Sequence[tuple[bytes, bytes]], authserv_id: str
                ) -> tuple[list[str], bytes]:
    """The results of every Authentication-Results header carrying ``authserv_id``, in order,
    as written (comments kept: dkimpy's own AAR drops them), and the ``cv`` that the ``arc=``
    result gives (``none`` without one, ``fail`` with several), as dkimpy's ``sign`` takes
    it. Headers are read by the ``authres`` library (:mod:`filters._arheader`); one it cannot
    parse is left out, as dkimpy does (the ``authres`` filter has removed such headers when
    they name our authserv-id)."""
    results: list[str] = []
    parsed_results: list[Any] = []
    for name, value in headers:
        if name.lower() != b"authentication-results":
            continue
        parsed = _arheader.parse(value.decode("utf-8", "surrogateescape"))
        if parsed is None or parsed.authserv_id != authserv_id.lower():
            continue
        results += parsed.texts
        parsed_results += parsed.results
    arcs = [r for r in parsed_results if str(r.method).lower() == "arc"]
    if not arcs:
        return results, dkim.CV_None
    if len(arcs) > 1:
        return results, dkim.CV_Fail
    return results, str(arcs[0].result).lower().encode()


def aar_result(aar: str, method: str) -> str | None:
    """What an ARC-Authentication-Results value (``i=N; authserv-id; results``) says for
    ``method`` (e.g. ``dmarc`` -> ``pass``), read by the ``authres`` library; None when it
    says nothing for it, when its results for it disagree, or when the value is unparsable."""
    parsed = _arheader.parse_aar(aar)
    if parsed is None:
        return None
    found = {str(r.result).lower() for r in parsed.results if str(r.method).lower() == method}
    return found.pop() if len(found) == 1 else None


class _Arc(dkim.ARC):
    """dkimpy's ARC signer with the ARC-Authentication-Results built by :func:`consolidate`
    (the A-R results as written, comments included). The rest follows dkimpy's ``sign``."""

    headers: list[tuple[bytes, bytes]]

    def sign(self, selector: bytes, domain: bytes, privkey: bytes, srv_id: bytes,
             include_headers: list[bytes] | None = None, timestamp: int | None = None,
             standardize: bool = False) -> list[bytes]:
        self.add_should_not(("Authentication-Results",))
        pk = parse_pem_private_key(privkey)
        results, cv = consolidate(self.headers, srv_id.decode())
        if not results:
            return []
        signed = tuple(x.lower() for x in (include_headers or self.default_sign_headers()))
        self.include_headers = signed
        if b"from" not in signed:
            raise dkim.ParameterError("The From header field MUST be signed")
        for x in set(signed) & set(self.should_not_sign):
            raise dkim.ParameterError(f"The {x!r} header field SHOULD NOT be signed")
        top, existing = self.sorted_arc_headers()
        instance = top + 1 if existing else 1
        if instance > 50:
            raise dkim.ParameterError("Maximum instance tag value exceeded")
        if instance == 1 and cv != dkim.CV_None:
            raise dkim.ParameterError("No existing chain found on message, cv should be none")
        if instance != 1 and cv == dkim.CV_None:
            return []  # the chain ended before us: nothing to add to
        arc_headers = [y for _, y in existing] if cv != dkim.CV_Fail else []
        sep = self.linesep
        aar = (f"i={instance}; ".encode() + srv_id
               + b"".join(b";" + sep + b" " + r.encode() for r in results) + sep)
        canon = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        new_set = [b"ARC-Authentication-Results: " + aar]
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers
        self.hasher = HASH_ALGORITHMS[self.signature_algorithm]
        h = self.hasher()
        h.update(canon.canonicalize_body(self.body))
        bodyhash = base64.b64encode(h.digest())
        stamp = str(timestamp or int(time.time())).encode("ascii")
        ams_fields = [(b"i", str(instance).encode()), (b"a", self.signature_algorithm),
                      (b"c", b"relaxed/relaxed"), (b"d", domain), (b"s", selector),
                      (b"t", stamp), (b"h", b" : ".join(signed)), (b"bh", bodyhash),
                      (b"b", b"0" * 60)]
        ams = self.gen_header(ams_fields, signed, canon, b"ARC-Message-Signature", pk,
                              standardize)
        new_set.append(b"ARC-Message-Signature: " + ams)
        arc_headers.insert(0, (b"ARC-Message-Signature", ams))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers
        as_fields = [(b"i", str(instance).encode()), (b"cv", cv),
                     (b"a", self.signature_algorithm), (b"d", domain), (b"s", selector),
                     (b"t", stamp), (b"b", b"0" * 60)]
        as_headers = [x[0].lower() for x in arc_headers]
        as_headers.reverse()
        if cv == dkim.CV_Fail:  # a failed chain: the seal covers only the newest set
            self.headers.reverse()
        seal_value = self.gen_header(as_fields, as_headers, canon, b"ARC-Seal", pk,
                                     standardize)
        new_set.append(b"ARC-Seal: " + seal_value)
        new_set.reverse()
        return new_set


def _set(s: Mapping[bytes | str, Any]) -> dict[str, Any]:
    def text(v: Any) -> str:
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

    return {"i": s.get("instance"), "as_domain": text(s.get("as-domain", "")).lower(),
            "ams_domain": text(s.get("ams-domain", "")).lower(),
            "cv": text(s.get("cv", "")).lower(), "as_valid": bool(s.get("as-valid")),
            "ams_valid": bool(s.get("ams-valid")), "aar": text(s.get("aar-value", ""))}


def _sealer(cfg: Mapping[str, Any], locate: Callable[[str], Path] = Path
            ) -> Sealer | None:
    given = [k for k in SEAL_KEYS if k in cfg]
    if not given:
        if "seal_headers" in cfg:
            raise ConfigError("seal_headers", "set only with seal_domain, seal_selector and "
                                              "seal_key_file")
        return None
    for k in SEAL_KEYS:
        if k not in cfg:
            raise ConfigError(k, f"required with {', '.join(given)}")
    domain, selector = opt_str(cfg, "seal_domain") or "", opt_str(cfg, "seal_selector") or ""
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+", domain):
        raise ConfigError("seal_domain", f"not a domain name: {domain!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", selector):
        raise ConfigError("seal_selector", f"not a selector: {selector!r}")
    key = read_key(cfg, "seal_key_file", locate)
    headers = signed_headers(cfg, "seal_headers")
    return Sealer(domain.lower(), selector, key, headers)


def read_key(cfg: Mapping[str, Any], key: str,
             locate: Callable[[str], Path] = Path) -> bytes:
    """An RSA private key (PEM) from the file the setting names (``locate``: a relative path
    resolved, ``Services.path``); ConfigError if unusable."""
    path = locate(opt_str(cfg, key) or "")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    try:
        parse_pem_private_key(data)
    except (UnparsableKeyError, ValueError, IndexError) as e:
        raise ConfigError(key, f"{path} is not a PEM RSA private key: {e}") from None
    return data


def signed_headers(cfg: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    """A list of header names to sign (``from`` required), or None when not set."""
    if key not in cfg:
        return None
    names = tuple(n.strip().lower() for n in str_list(cfg, key))
    if "from" not in names:
        raise ConfigError(key, "must include From (RFC 6376 5.4)")
    bad: Sequence[str] = [n for n in names if n in _NEVER_SIGN or not n
                          or not re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", n)]
    if bad:
        raise ConfigError(key, f"cannot sign {', '.join(repr(b) for b in bad)}")
    return names


def check_arc_signer() -> str | None:
    """None when dkimpy's internals that ``_Arc`` uses are there and ``_Arc`` seals a known
    message exactly as dkimpy's own ``ARC.sign`` does, and dkimpy validates that seal."""
    for name in ("gen_header", "sorted_arc_headers", "add_should_not", "default_sign_headers"):
        if not callable(getattr(dkim.ARC, name, None)):
            return f"dkim.ARC.{name} is missing"
    params = list(inspect.signature(dkim.ARC.gen_header).parameters)
    if params[:7] != ["self", "fields", "include_headers", "canon_policy", "header_name", "pk",
                      "standardize"]:
        return f"dkim.ARC.gen_header takes ({', '.join(params)})"
    args = (b"s1", b"selftest.invalid", PRIVATE_KEY, b"mx.selftest.invalid")
    ours = _Arc(AR_MESSAGE).sign(*args, timestamp=1765152000)
    if ours != dkim.ARC(AR_MESSAGE).sign(*args, timestamp=1765152000):
        return "the seal of a known message is not dkimpy's own"

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return KEY_RECORD if name.rstrip(b".") == KEY_NAME else None

    cv = dkim.ARC(b"".join(ours) + AR_MESSAGE).verify(dnsfunc=lookup)[0]
    if cv != dkim.CV_Pass:
        return f"dkimpy validates the seal of a known message as {cv!r}"
    return None


ARC_SIGNER = patches.install("dkimpy.arc-sealer", check_arc_signer)
