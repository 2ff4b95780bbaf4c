"""The ``dkim_sign`` filter: DKIM signatures (RFC 6376; rsa-sha256, or ed25519-sha256 per RFC
8463) on mail from configured domains, for gateways that also carry outbound mail. It signs in
the signing step (``on_sign``): after the decision, only mail that is relayed, over the final
header block (its Received:, edits, subject rewrite), so nothing changes after the signature.

Which mail: the RFC5322.From domain (exactly one) is looked up in ``domains``, the domain itself
first, then each parent (``news.example.com`` is signed with ``example.com``'s key, d=
example.com: aligned for relaxed DMARC). With ``only_trusted_clients = true`` (the default) only
mail from clients in ``trusted_networks`` is signed: mail from the internet claiming one of our
domains must never get our signature.

Settings::

    only_trusted_clients = true
    [filters.domains."example.com"]
    selector = "mail2026"
    key_file = "keys/example.com.pem"      # RSA: PEM; Ed25519: base64 of the 32-byte seed
    algorithm = "rsa-sha256"                # or "ed25519-sha256"; default from the key
    headers = ["from", "to", "subject", …]  # signed when present (default: DEFAULT_HEADERS)
    oversign = ["from", "subject", …]       # signed once more than present: none can be added

Canonicalization is relaxed/relaxed; ``t=`` is set, ``x=`` is not. A message larger than
``max_bytes`` (default 25 MiB) is relayed unsigned and that is logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim

from filters.arc import read_key
from filters.dmarc import from_domain
from gateway.filterapi import AddHeader, ConfigError, Filter, FilterContext
from gateway.services import Services
from gateway.settings import boolean, check_keys, integer, opt_str, str_list

log = logging.getLogger("mailgate.filter.dkim_sign")

DEFAULT_HEADERS = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
                   "in-reply-to", "references", "mime-version", "content-type",
                   "content-transfer-encoding", "list-id", "list-unsubscribe",
                   "list-unsubscribe-post")
DEFAULT_OVERSIGN = ("from", "reply-to", "to", "cc", "subject", "date", "message-id",
                    "mime-version", "content-type", "content-transfer-encoding")
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
DOMAIN_KEYS = {"selector", "key_file", "algorithm", "headers", "oversign"}
_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_NEVER = {"dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
          "authentication-results", "received", "return-path", "bcc"}


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    key: bytes  # PEM (RSA) or base64 seed (Ed25519), as dkimpy takes it
    algorithm: str
    headers: tuple[str, ...]
    oversign: frozenset[str]


class DkimSignFilter(Filter):
    name = "dkim_sign"

    def __init__(self, keys: Mapping[str, SigningKey], *, only_trusted_clients: bool = True,
                 max_bytes: int = 25 * 1024 * 1024) -> None:
        self.keys = dict(keys)
        self.only_trusted_clients = only_trusted_clients
        self.max_bytes = max_bytes

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> DkimSignFilter:
        check_keys(cfg, {"domains", "only_trusted_clients", "max_bytes"})
        domains = cfg.get("domains")
        if not isinstance(domains, Mapping) or not domains:
            raise ConfigError("domains", 'must be a table of domains, e.g. [filters.domains.'
                                         '"example.com"] with selector and key_file')
        keys = {}
        bad: list[tuple[str, str]] = []  # every domain's problems, reported together
        for domain, spec in domains.items():
            try:
                keys[_domain(domain)] = _key(domain, spec, services.path)
            except ConfigError as e:
                bad.extend(e.every)
        if bad:
            raise ConfigError(*bad[0], more=tuple(bad[1:]))
        return cls(keys, only_trusted_clients=boolean(cfg, "only_trusted_clients", True),
                   max_bytes=integer(cfg, "max_bytes", 25 * 1024 * 1024, 1))

    def key_for(self, domain: str) -> SigningKey | None:
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            found = self.keys.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None

    async def on_sign(self, ctx: FilterContext, header_block: bytes) -> tuple[AddHeader, ...]:
        msg = ctx.message
        assert msg is not None
        if self.only_trusted_clients and not ctx.client.trusted:
            return ()
        domain, _why = from_domain(msg.get_all("From"))
        key = self.key_for(domain) if domain else None
        if key is None:
            return ()
        if msg.size > self.max_bytes:
            log.warning("not DKIM-signed (qid %s): %d bytes, over max_bytes", ctx.qid, msg.size)
            return ()

        def build() -> str:
            with msg.path.open("rb") as f:
                f.seek(msg.body_offset)
                body = f.read()
            return sign(header_block + b"\r\n" + body, key)

        value = await asyncio.to_thread(build)
        return (AddHeader("DKIM-Signature", value),)


def sign(raw: bytes, key: SigningKey) -> str:
    """The DKIM-Signature value (folded as dkimpy folds it) for the whole message ``raw``."""
    signer = dkim.DKIM(raw, signature_algorithm=key.algorithm.encode())
    present: dict[str, int] = {}
    for name, _ in signer.headers:
        n = name.decode("ascii", "replace").lower()
        present[n] = present.get(n, 0) + 1
    include = []
    for h in key.headers:
        include += [h.encode()] * (present.get(h, 0) + (1 if h in key.oversign else 0))
    line = signer.sign(key.selector.encode(), key.domain.encode(), key.key,
                       canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
    return line.decode("ascii").partition(":")[2]


def _domain(text: Any) -> str:
    d = str(text).strip().rstrip(".").lower()
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", d):
        raise ConfigError(f"domains.{text}", "not a domain name")
    return d


def _key(domain: str, spec: Any, locate: Callable[[str], Path] = Path) -> SigningKey:
    where = f"domains.{domain}"
    if not isinstance(spec, Mapping):
        raise ConfigError(where, "must be a table with selector and key_file")
    try:
        check_keys(spec, DOMAIN_KEYS)
        selector = opt_str(spec, "selector")
        if selector is None or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*",
                                                selector):
            raise ConfigError("selector", "required: a DKIM selector (letters, digits, - _ .)")
        if "key_file" not in spec:
            raise ConfigError("key_file", "required: the private key file")
        key, algorithm = _read(spec, locate)
        headers = tuple(dict.fromkeys(h.strip().lower() for h in str_list(spec, "headers"))) \
            if "headers" in spec else DEFAULT_HEADERS
        oversign = frozenset(h.strip().lower() for h in str_list(spec, "oversign")) \
            if "oversign" in spec else frozenset(DEFAULT_OVERSIGN)
        for k, names in (("headers", headers), ("oversign", oversign)):
            bad = sorted(n for n in names if n in _NEVER or not _NAME.fullmatch(n))
            if bad:
                raise ConfigError(k, f"cannot sign {', '.join(bad)}")
        if "from" not in headers:
            raise ConfigError("headers", "must include from (RFC 6376 5.4)")
        if not oversign <= set(headers):
            raise ConfigError("oversign", "every name must also be in headers")
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.key}", e.reason,
                          tuple((f"{where}.{k}", r) for k, r in e.every[1:])) from None
    return SigningKey(_domain(domain), selector, key, algorithm, headers, oversign)


def _read(spec: Mapping[str, Any], locate: Callable[[str], Path] = Path
          ) -> tuple[bytes, str]:
    algorithm = opt_str(spec, "algorithm")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ConfigError("algorithm", f"must be one of {', '.join(ALGORITHMS)}")
    path = locate(opt_str(spec, "key_file") or "")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError("key_file", f"cannot read {path}: {e.strerror}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        if algorithm == "ed25519-sha256":
            raise ConfigError("key_file", f"{path}: give an Ed25519 key as the base64 of its "
                                          f"32-byte seed (dknewkey --ktype ed25519)")
        return read_key(spec, "key_file", locate), "rsa-sha256"
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32 or algorithm == "rsa-sha256":
        raise ConfigError("key_file", f"{path}: neither a PEM RSA key nor a base64 Ed25519 "
                                      f"seed")
    return data.strip(), "ed25519-sha256"
