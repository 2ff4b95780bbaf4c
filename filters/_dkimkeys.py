"""DKIM key records for the dkim and arc filters: fetched concurrently through the gateway's
async resolver *before* dkimpy runs, then served to dkimpy's ``dnsfunc`` from that map, so
no worker thread ever waits on DNS and each lookup's outcome (timeout, NXDOMAIN, record) is
known exactly. Also: reading a signing key file, and key records parsed once (``evaluate_pk``,
installed in dkimpy once it has given dkimpy's own answers for a known record: patch
``dkimpy.evaluate-pk-cache``, gateway/patches.py).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dkim

import filters._dkimcrypto  # noqa: F401 - dkimpy with linear int <-> bytes (see there)
from filters._dkimvectors import KEY_NAME, KEY_RECORD
from gateway import patches
from gateway.dnsresolver import DnsAnswer, Resolver

KeyAnswers = dict[str, DnsAnswer | None]  # key name -> answer; None: cut by the deadline

_evaluate_pk = getattr(dkim, "evaluate_pk", None)  # dkimpy's own


@functools.lru_cache(maxsize=256)  # a few hundred bytes and one public key each
def evaluate_pk(name: bytes | str, s: bytes | str | None) -> tuple[Any, ...]:
    """``dkim.evaluate_pk`` that parses each key record once: a verification asked it twice
    per signature (our key check, then dkimpy's own lookup), and each time decoded the base64
    and walked the ASN.1 of the same key. The result (the public key, its size, k=, whether
    s=tlsrpt) depends on the arguments alone, and a record that fails raises each time
    (``lru_cache`` keeps no exception). Installed as ``dkim.evaluate_pk``, which dkimpy's
    ``load_pk_from_dns`` calls (DKIM and ARC); the key objects are only read."""
    assert _evaluate_pk is not None
    return tuple(_evaluate_pk(name, s))


def check_evaluate_pk() -> str | None:
    """None when dkimpy still looks its keys up through ``dkim.evaluate_pk(name, s)`` and the
    cached one answers as dkimpy's own for a known record (and refuses a revoked one); else
    why not."""
    if not callable(_evaluate_pk):
        return "dkim.evaluate_pk is missing"
    if not patches.calls(getattr(dkim, "load_pk_from_dns", None), "evaluate_pk"):
        return "dkim.load_pk_from_dns no longer calls evaluate_pk"
    params = list(inspect.signature(_evaluate_pk).parameters)
    if params != ["name", "s"]:
        return f"dkim.evaluate_pk takes ({', '.join(params)}), not (name, s)"
    want = tuple(_evaluate_pk(KEY_NAME, KEY_RECORD))
    if evaluate_pk(KEY_NAME, KEY_RECORD) != want or evaluate_pk(KEY_NAME, KEY_RECORD) != want:
        return "the cached answer for a known key record is not dkimpy's"
    for refused in (_evaluate_pk, evaluate_pk):
        try:
            refused(KEY_NAME, b"v=DKIM1; k=rsa; p=")
        except dkim.DKIMException:
            continue
        return "a revoked key record (empty p=) was not refused"
    return None


def _apply_evaluate_pk() -> None:
    dkim.evaluate_pk = evaluate_pk


patches.install("dkimpy.evaluate-pk-cache", check_evaluate_pk, _apply_evaluate_pk)


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
