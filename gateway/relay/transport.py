"""Downstream transport addresses: parse ``smtp://host:port``, ``lmtp://host:port``,
``lmtp:unix:/path``, ``maildir:PATH`` and ``mx`` / ``mx:PORT`` into a value, and pick one per
recipient domain. ``smtp://a:25,b:25`` names several hosts, tried in order (failover); ``mx``
delivers to the recipient domain's own MX hosts (see :mod:`gateway.relay.mx`), so
:func:`transport_for` binds it to that domain."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

Kind = Literal["smtp", "lmtp", "maildir", "mx"]
MX_PORT = 25


@dataclass(frozen=True, slots=True)
class Transport:
    kind: Kind
    host: str = ""
    port: int = 0
    path: Path | None = None  # maildir directory, or the unix socket for lmtp:unix:
    alternates: tuple[tuple[str, int], ...] = ()  # further hosts, tried in order on failure
    domain: str = ""  # mx: the recipient domain whose MX hosts are used (set by transport_for)

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.alternates)

    def __str__(self) -> str:
        if self.kind == "maildir":
            return f"maildir:{self.path}"
        if self.kind == "mx":
            return f"mx:{self.port}" + (f" ({self.domain})" if self.domain else "")
        if self.path is not None:
            return f"{self.kind}:unix:{self.path}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"{self.kind}://{hosts}"


def parse_transport(text: str) -> Transport:
    """Parse a transport string; raises ValueError with a reason an admin can act on."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a string like smtp://host:port, lmtp://host:port, maildir:DIR "
                         "or mx")
    if text == "mx" or text.startswith("mx:"):
        port_s = text[3:] if text != "mx" else str(MX_PORT)
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"bad port {port_s!r} (mx or mx:PORT)")
        return Transport("mx", port=int(port_s))
    if text.startswith("maildir:"):
        path = text[len("maildir:"):]
        if not path:
            raise ValueError("maildir: needs a directory")
        return Transport("maildir", path=Path(path))
    if text.startswith("lmtp:unix:"):
        path = text[len("lmtp:unix:"):]
        if not path:
            raise ValueError("lmtp:unix: needs a socket path")
        return Transport("lmtp", path=Path(path))
    for kind in ("smtp", "lmtp"):
        prefix = f"{kind}://"
        if text.startswith(prefix):
            hosts = [_endpoint(kind, part) for part in text[len(prefix):].rstrip("/").split(",")]
            (host, port), rest = hosts[0], tuple(hosts[1:])
            return Transport(kind, host=host, port=port, alternates=rest)
    raise ValueError("must start with smtp://, lmtp://, lmtp:unix: or maildir:, or be mx[:PORT]")


def _endpoint(kind: str, rest: str) -> tuple[str, int]:
    rest = rest.strip()
    if rest.startswith("["):
        host, sep, port_s = rest[1:].partition("]:")
        if not sep:
            raise ValueError("IPv6 host needs the form [addr]:port")
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            raise ValueError(f"{kind}:// needs host:port")
    if not host:
        raise ValueError("missing host")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port {port_s!r}")
    return host, int(port_s)


def transport_for(domain: str, default: Transport, by_domain: Mapping[str, Transport]) -> Transport:
    """The transport for a recipient domain: exact match, then parent domains (``.example.test``
    entries match subdomains), then the default. An ``mx`` transport comes back bound to
    ``domain`` (recipients of different domains go to different MX hosts)."""
    d = domain.lower()
    t = _lookup(d, default, by_domain)
    return replace(t, domain=d) if t.kind == "mx" else t


def _lookup(d: str, default: Transport, by_domain: Mapping[str, Transport]) -> Transport:
    if d in by_domain:
        return by_domain[d]
    labels = d.split(".")
    for i in range(1, len(labels)):
        key = "." + ".".join(labels[i:])
        if key in by_domain:
            return by_domain[key]
    return default
