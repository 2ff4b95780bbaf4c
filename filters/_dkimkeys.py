"""DKIM key records for the dkim and arc filters: fetched concurrently through the gateway's
async resolver *before* dkimpy runs, then served to dkimpy's ``dnsfunc`` from that map, so
no worker thread ever waits on DNS and each lookup's outcome (timeout, NXDOMAIN, record) is
known exactly. Also: reading a signing key file, and key records parsed once (``evaluate_pk``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dkim

import filters._dkimcrypto  # noqa: F401 - dkimpy with linear int <-> bytes (see there)
from gateway.dnsresolver import DnsAnswer, Resolver

KeyAnswers = dict[str, DnsAnswer | None]  # key name -> answer; None: cut by the deadline

_evaluate_pk = dkim.evaluate_pk


@functools.lru_cache(maxsize=256)  # a few hundred bytes and one public key each
def evaluate_pk(name: bytes | str, s: bytes | str | None) -> tuple[Any, ...]:
    """``dkim.evaluate_pk`` that parses each key record once: a verification asked it twice
    per signature (our key check, then dkimpy's own lookup), and each time decoded the base64
    and walked the ASN.1 of the same key. The result (the public key, its size, k=, whether
    s=tlsrpt) depends on the arguments alone, and a record that fails raises each time
    (``lru_cache`` keeps no exception). Installed as ``dkim.evaluate_pk``, which dkimpy's
    ``load_pk_from_dns`` calls (DKIM and ARC); the key objects are only read."""
    return tuple(_evaluate_pk(name, s))


dkim.evaluate_pk = evaluate_pk


async def prefetch(resolver: Resolver, names: Iterable[str], timeout_s: float
                   ) -> KeyAnswers:
    """Each ``selector._domainkey.domain`` TXT record, asked for concurrently, within one
    deadline."""
    tasks = {n: asyncio.ensure_future(resolver.query(n, "TXT")) for n in set(names)}
    if not tasks:
        return {}
    await asyncio.wait(tasks.values(), timeout=timeout_s)
    out: KeyAnswers = {}
    for n, t in tasks.items():
        if t.done() and not t.cancelled() and t.exception() is None:
            out[n] = t.result()
        else:
            t.cancel()
            out[n] = None
    return out


def txt(ans: DnsAnswer | None) -> bytes | None:
    """The first TXT record's strings joined (RFC 6376 3.6.2.2), or None."""
    if ans is None or not ans.ok:
        return None
    for rr in ans.records:
        strings = getattr(rr, "strings", None)
        if strings is not None:
            return b"".join(strings)
    return None


def dnsfunc(served: KeyAnswers) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that answers from ``served`` only (anything else: no record)."""
    records = {name: txt(ans) for name, ans in served.items()}

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        key = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        return records.get(key.lower().rstrip("."))

    return lookup


def temperrors(served: KeyAnswers) -> list[str]:
    """The key names whose lookup timed out or failed temporarily."""
    return sorted(n for n, a in served.items() if a is None or a.status == "temperror")


def read_private_key(path: Path) -> bytes:
    """A private key file's bytes (PEM for RSA; PEM or raw base64 for Ed25519)."""
    return path.read_bytes()
