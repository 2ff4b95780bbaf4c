"""The ``dkim`` filter: verifies every DKIM-Signature of a message (RFC 6376 rsa-sha256, RFC 8463
ed25519-sha256) with dkimpy, key records fetched through the gateway's async DNS resolver.

Symbols (one per result, one option per signature: ``"d=example.com s=sel a=rsa-sha256"``):
DKIM_PASS, DKIM_FAIL (signature or body hash does not verify), DKIM_NONE (no signature),
DKIM_TEMPERROR (key lookup timed out / SERVFAIL), DKIM_PERMERROR (bad signature syntax, key
record missing, revoked or unusable), DKIM_POLICY (not verified by our limits: message larger
than ``max_bytes``, or more signatures than ``max_signatures``).

``data["signatures"]``: ``[{"d", "s", "a", "result", "reason", "aligned_domain"}]`` in header
order, for DMARC; ``aligned_domain`` is the lower-cased ``d=`` (the identifier DMARC aligns).

DNS: keys are *prefetched*. Each signature's ``s._domainkey.d`` TXT record is asked for
concurrently with the async resolver, on the event loop, before verification; dkimpy (blocking)
then runs with a ``dnsfunc`` that only reads that prefetched map (``offload``: on the loop for a
small message, in the worker's CPU thread for a big one). Verification never waits on the
loop, a lookup's outcome (timeout vs. NXDOMAIN vs. bad record) is known exactly, and the
lookups share one deadline (``dns_timeout_s``).

Body hashes are streamed from the spool (``_SpoolVerifier``, which takes over a part of dkimpy's
``verify_sig_process``) once that has verified a known signed message as dkimpy does and given
dkimpy's body hashes for known bodies (patch ``dkimpy.spool-body-hash``, gateway/patches.py);
otherwise dkimpy verifies the whole message (up to ``max_bytes``) its own way.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import HASH_ALGORITHMS
from dkim.util import InvalidTagValueList, parse_tag_value

from filters._dkimbody import BLOCK, body_hash
from filters._dkimkeys import KeyAnswers, dnsfunc, prefetch, txt
from filters._dkimvectors import KEY_NAME, KEY_RECORD, SIGNED
from gateway import patches
from gateway.dnsresolver import DnsAnswer, DnsResolver, per_message
from gateway.filterapi import Filter, FilterContext, Result, Symbol, offload
from gateway.message import Message
from gateway.policy.schema import DnsConfig
from gateway.services import Services
from gateway.settings import check_keys, integer, positive

PASS, FAIL, NONE, TEMPERROR, PERMERROR, POLICY = (
    "pass", "fail", "none", "temperror", "permerror", "policy")
SYMBOLS = {PASS: "DKIM_PASS", FAIL: "DKIM_FAIL", NONE: "DKIM_NONE", TEMPERROR: "DKIM_TEMPERROR",
           PERMERROR: "DKIM_PERMERROR", POLICY: "DKIM_POLICY"}
SETTINGS = {"max_bytes", "max_signatures", "dns_timeout_s", "min_rsa_bits"}
_SIG_HEADER = b"dkim-signature"


@dataclass
class Signature:
    """One DKIM-Signature header and what became of it."""

    index: int  # among the DKIM-Signature headers, top first (dkimpy's idx)
    d: str = ""
    s: str = ""
    a: str = ""
    result: str = ""
    reason: str = ""

    @property
    def key_name(self) -> str:
        return f"{self.s}._domainkey.{self.d}".lower()

    @property
    def option(self) -> str:
        return f"d={self.d or '?'} s={self.s or '?'} a={self.a or '?'}"

    def as_data(self) -> dict[str, str]:
        return {"d": self.d, "s": self.s, "a": self.a, "result": self.result,
                "reason": self.reason, "aligned_domain": self.d.lower()}


class DkimVerifyFilter(Filter):
    name = "dkim"

    def __init__(self, resolver: DnsResolver, *, max_bytes: int = 10 * 1024 * 1024,
                 max_signatures: int = 10, dns_timeout_s: float = 5.0,
                 min_rsa_bits: int = 1024) -> None:
        self.resolver = resolver
        self.max_bytes = max_bytes
        self.max_signatures = max_signatures
        self.dns_timeout_s = dns_timeout_s
        self.min_rsa_bits = min_rsa_bits

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> DkimVerifyFilter:
        check_keys(cfg, SETTINGS)
        # The policy's [dns] resolver once Services carries one; until then the system's.
        resolver = getattr(services, "resolver", None) or DnsResolver(DnsConfig())
        return cls(resolver,
                   max_bytes=integer(cfg, "max_bytes", 10 * 1024 * 1024, 1),
                   max_signatures=integer(cfg, "max_signatures", 10, 1),
                   dns_timeout_s=positive(cfg, "dns_timeout_s", 5.0),
                   min_rsa_bits=integer(cfg, "min_rsa_bits", 1024, 512))

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        if msg.size > self.max_bytes:  # never read: every signature the header shows is POLICY
            return _settled(msg, POLICY,
                            f"message of {msg.size} bytes is over max_bytes ({self.max_bytes})")
        try:
            verifier = await offload(msg.size, _load, msg, self.max_bytes, self.min_rsa_bits)
        except dkim.DKIMException as e:  # a header block dkimpy cannot parse
            return _settled(msg, PERMERROR, f"unparsable message: {str(e)[:200]}")
        # dkimpy's own header list, so that our index is the idx dkimpy verifies
        raws = [v for n, v in verifier.headers if n.lower() == _SIG_HEADER]
        sigs = [Signature(i) for i in range(len(raws))]
        for sig, raw in zip(sigs, raws, strict=True):
            _parse(sig, raw)
        for sig in sigs[self.max_signatures:]:
            sig.result, sig.reason = POLICY, f"over max_signatures ({self.max_signatures})"
        todo = [s for s in sigs if not s.result]
        if not todo:
            return _result(sigs)
        keys = await prefetch(per_message(ctx.dns, self.resolver), {s.key_name for s in todo},
                              self.dns_timeout_s)
        for sig in todo:
            _judge_key(sig, keys.get(sig.key_name))
        todo = [s for s in todo if not s.result]
        if todo:
            await offload(msg.size, _verify_all, verifier, todo, keys)
        return _result(sigs)


def _load(msg: Message, max_bytes: int, min_rsa_bits: int) -> dkim.DKIM:
    """Blocking (``offload``): the header block parsed by dkimpy (the body is hashed from the
    spool by _SpoolVerifier); the whole message (capped) when the spooled header block was cut."""
    if SPOOL_HASHING and (msg.header_bytes.endswith(b"\r\n\r\n")
                          or len(msg.header_bytes) == msg.size):
        return _SpoolVerifier(msg, min_rsa_bits)
    with msg.path.open("rb") as f:
        return dkim.DKIM(f.read(max_bytes), minkey=min_rsa_bits)


class _SpoolVerifier(dkim.DKIM):
    """dkimpy given the header block only: each signature's body hash is computed here, streamed
    from the spool file in blocks (filters/_dkimbody.py), and checked before dkimpy checks the
    header signature, so the body is never held (dkimpy's relaxed canonicalization of a whole
    10 MiB prose body peaks at ~400 MB). Hashes are shared by signatures with the same
    canonicalization, algorithm and l=."""

    def __init__(self, msg: Message, min_rsa_bits: int) -> None:
        super().__init__(msg.header_bytes, minkey=min_rsa_bits)
        self._msg = msg
        self._hashes: dict[tuple[bytes, bytes, int | None], bytes] = {}

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Any) -> bool:
        if b"bh" in sig:
            try:
                canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
            except InvalidCanonicalizationPolicyError:  # dkimpy reports it
                return bool(super().verify_sig_process(sig, include_headers, sig_header, dnsfunc))
            length = int(sig[b"l"]) if b"l" in sig and not self.tlsrpt else None
            key = (canon.body_algorithm.name, sig[b"a"], length)
            if key not in self._hashes:
                self._hashes[key] = body_hash(self._msg_body(), key[0] == b"relaxed",
                                              HASH_ALGORITHMS[sig[b"a"]], length)
            got = self._hashes[key]
            if got != base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"])):
                raise dkim.ValidationError(f"body hash mismatch (got {base64.b64encode(got)!r}, "
                                           f"expected {sig[b'bh']!r})")
            sig = {k: v for k, v in sig.items() if k != b"bh"}  # checked: dkimpy skips it
        return bool(super().verify_sig_process(sig, include_headers, sig_header, dnsfunc))

    def _msg_body(self) -> Iterator[bytes]:
        with self._msg.open_body() as f:
            while block := f.read(BLOCK):
                yield block


class _KnownMessage:
    """A message held in memory, as much of :class:`Message` as _SpoolVerifier reads."""

    def __init__(self, raw: bytes) -> None:
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        self.header_bytes = head + sep

    def open_body(self) -> io.BytesIO:
        return io.BytesIO(self.body)


_KNOWN_BODIES = (b"", b"\r\n", b"\r\n\r\n", b"a", b"a\r\n", b"\t \r\n x\r\n",
                 b" a \t b  \r\n\r\n c\t\r\n\r\n\r\n", b"line\r\n\r\n.dot\r\n  \r\n\t\r\n",
                 b"x" * (BLOCK - 3) + b" \t \r\n y \r\n\r\n" + b"z" * 9 + b"\r\n")  # two blocks


def check_spool_verifier() -> str | None:
    """None when dkimpy still verifies through ``verify_sig_process`` as _SpoolVerifier
    expects, :func:`body_hash` gives dkimpy's body hashes for known bodies, and the known
    signed message verifies (and fails once its body changes); else why not."""
    own = getattr(dkim.DKIM, "verify_sig_process", None)
    if own is None:
        return "dkim.DKIM.verify_sig_process is missing"
    params = list(inspect.signature(own).parameters)
    if params != ["self", "sig", "include_headers", "sig_header", "dnsfunc"]:
        return f"dkim.DKIM.verify_sig_process takes ({', '.join(params)})"
    if not patches.calls(getattr(dkim.DKIM, "verify_sig", None), "verify_sig_process"):
        return "dkim.DKIM.verify_sig no longer calls verify_sig_process"
    for c in (b"simple", b"relaxed"):
        canon = CanonicalizationPolicy.from_c_value(c + b"/" + c)
        for body in _KNOWN_BODIES:
            canonical = canon.canonicalize_body(body)
            for length in (None, 0, 7):
                want = hashlib.sha256(canonical[:length]).digest()
                pieces = [body[i:i + 5] for i in range(0, min(len(body), 100), 5)]
                pieces.append(body[100:])
                got = body_hash(pieces, c == b"relaxed", hashlib.sha256, length)
                if got != want:
                    return f"the {c.decode()} body hash of a known body is not dkimpy's"

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return KEY_RECORD if name.rstrip(b".") == KEY_NAME else None

    for raw, want_ok in ((SIGNED, True), (SIGNED.replace(b"two", b"too"),
                                          False)):
        verifier = _SpoolVerifier(cast(Message, _KnownMessage(raw)), 1024)
        for idx in (0, 1):
            try:
                ok = verifier.verify(idx=idx, dnsfunc=lookup)
            except dkim.ValidationError:
                ok = False
            if ok is not want_ok:
                return (f"a known {'good' if want_ok else 'broken'} signature (c="
                        f"{'simple' if idx == 0 else 'relaxed'}) did not "
                        f"{'pass' if want_ok else 'fail'}")
    return None


SPOOL_HASHING = patches.install("dkimpy.spool-body-hash", check_spool_verifier)


def _verify_all(verifier: dkim.DKIM, sigs: list[Signature], served: KeyAnswers) -> None:
    """Blocking (``offload``): dkimpy verification, DNS answered from ``served`` only."""
    lookup = dnsfunc(served)
    for sig in sigs:
        try:
            ok = verifier.verify(idx=sig.index, dnsfunc=lookup)
        except dkim.ValidationError as e:  # body hash mismatch
            sig.result, sig.reason = FAIL, str(e)[:200]
            continue
        except dkim.DKIMException as e:  # key too small, bad c=, bad base64 …
            sig.result, sig.reason = PERMERROR, f"{type(e).__name__}: {str(e)[:200]}"
            continue
        except Exception as e:  # dkimpy on hostile input must not abort the others
            sig.result, sig.reason = PERMERROR, f"{type(e).__name__}: {str(e)[:200]}"
            continue
        sig.result, sig.reason = (PASS, "") if ok else (FAIL, "signature did not verify")


def _settled(msg: Message, result: str, reason: str) -> Result:
    """Every signature the spooled header block shows, given one result without verifying."""
    sigs = [Signature(i) for i in range(len(_sig_headers(msg)))]
    for sig, raw in zip(sigs, _sig_headers(msg), strict=True):
        _parse(sig, raw)
        sig.result, sig.reason = result, reason
    return _result(sigs)


def _sig_headers(msg: Message) -> list[bytes]:
    """The values of the DKIM-Signature headers, raw, in order."""
    out = []
    for h in msg.headers:
        if h.name.lower().encode() == _SIG_HEADER:
            out.append(h.raw.partition(b":")[2])
    return out


def _parse(sig: Signature, raw: bytes) -> None:
    """Fill d=, s=, a= from the header; a syntax error settles the signature as PERMERROR."""
    try:
        tags = parse_tag_value(raw)
    except InvalidTagValueList as e:
        sig.result, sig.reason = PERMERROR, f"bad tag list: {e}"
        return
    sig.d = tags.get(b"d", b"").decode("ascii", "replace").strip()
    sig.s = tags.get(b"s", b"").decode("ascii", "replace").strip()
    sig.a = tags.get(b"a", b"").decode("ascii", "replace").strip()
    try:
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException as e:  # missing tag, bad d=, unknown a=, expired, future t= …
        sig.result, sig.reason = PERMERROR, str(e)[:200]
        return
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sig.s) or not sig.d:
        sig.result, sig.reason = PERMERROR, f"bad selector or domain: s={sig.s!r} d={sig.d!r}"


def _judge_key(sig: Signature, ans: DnsAnswer | None) -> None:
    """TEMPERROR / PERMERROR from the key lookup, or leave the signature to verify."""
    if ans is None:
        sig.result, sig.reason = TEMPERROR, f"key lookup of {sig.key_name} timed out"
    elif ans.status == "temperror":
        sig.result, sig.reason = TEMPERROR, f"key lookup of {sig.key_name}: {ans.error}"
    elif ans.status != "ok" or txt(ans) is None:
        sig.result, sig.reason = PERMERROR, f"no key record at {sig.key_name} ({ans.status})"
    else:
        try:
            tlsrpt_only = dkim.evaluate_pk(sig.key_name.encode(), txt(ans))[3]
        except dkim.DKIMException as e:  # empty p= (revoked), bad k=, v=, unknown s=, bad key
            sig.result, sig.reason = PERMERROR, f"unusable key record: {str(e)[:200]}"
            return
        except Exception as e:  # odd base64 and the like
            sig.result, sig.reason = PERMERROR, f"unusable key record: {type(e).__name__}"
            return
        if tlsrpt_only:
            sig.result, sig.reason = PERMERROR, "key record is for s=tlsrpt only, not e-mail"


def _result(sigs: list[Signature]) -> Result:
    if not sigs:
        return Result(symbols=(Symbol(SYMBOLS[NONE]),), data={"signatures": []})
    by_result: dict[str, list[str]] = {}
    for sig in sigs:
        by_result.setdefault(sig.result, []).append(sig.option)
    symbols = tuple(Symbol(SYMBOLS[r], tuple(opts)) for r, opts in by_result.items())
    return Result(symbols=symbols, data={"signatures": [s.as_data() for s in sigs]})
