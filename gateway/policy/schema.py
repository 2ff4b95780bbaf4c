"""The policy model: typed, frozen value objects that a validated policy file becomes.

Only :mod:`gateway.policy.loader` builds these; everything else reads them. Units are in the
names (``timeout_s``, ``max_message_bytes``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.filterapi import Action, Stage
from gateway.relay.transport import Transport
from gateway.replies import Reply

OnError = Literal["tempfail", "continue", "reject", "quarantine"]
BareLf = Literal["reject", "normalize"]
TlsLevel = Literal["none", "may", "encrypt", "verify"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    max_command_line_bytes: int = 2048
    max_line_bytes: int = 1000  # a text line in DATA, CRLF included (RFC 5321 4.5.3.1.6)
    max_message_bytes: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_invalid_commands: int = 10
    max_transactions_per_connection: int = 100
    max_refused_recipients: int = 50  # unknown users, relay denied...: then 421 and close
    idle_timeout_s: float = 300.0  # waiting for the next command (RFC 5321 4.5.3.2.7)
    command_timeout_s: float = 120.0  # handling one command, filters included
    data_block_timeout_s: float = 180.0  # waiting for the next block of DATA (4.5.3.2.6)
    data_timeout_s: float = 1800.0  # the whole DATA transfer
    # DATA's minimum rate (Postfix's smtpd_min_data_rate): each byte earns 1/rate s of credit,
    # at most data_rate_grace_s banked (the start's too); none left: 421 4.4.2. 0: no minimum
    min_data_rate_bytes_per_s: int = 500
    data_rate_grace_s: float = 30.0
    bare_lf: BareLf = "reject"
    shutdown_grace_s: float = 30.0
    max_session_s: float = 3600.0  # a connection's whole life, whatever it does
    # end-of-data checks (parse, message-stage filters, decision, queue commit) at once, per
    # worker; the others wait for a slot, for at most check_wait_s (gateway/checkgate.py)
    max_concurrent_checks: int = 64
    check_wait_s: float = 1.0
    # the MIME parse's structural bounds (gateway/mimebounds.py); beyond them the `mime`
    # filter reports MIME_TOO_DEEP / _MANY_PARTS / _MANY_HEADERS / _MANY_ENCODED_WORDS
    max_mime_depth: int = 50  # nested multipart/* and message/* levels (at most 200)
    max_mime_parts: int = 1000  # MIME entities in a message
    max_mime_headers: int = 1000  # header fields in one header block (the top one or a part's)
    max_mime_encoded_words: int = 1000  # RFC 2047 encoded words decoded in a message


@dataclass(frozen=True, slots=True)
class RelayConfig:
    mode: Literal["proxy", "queue"] = "queue"
    downstream: Transport = Transport("maildir", path=Path("Maildir"))
    transport: Mapping[str, Transport] = field(default_factory=dict)  # rcpt domain -> transport
    connect_timeout_s: float = 30.0
    command_timeout_s: float = 60.0  # each downstream reply (lockstep: the client waits)
    data_timeout_s: float = 600.0
    helo_name: str | None = None  # defaults to server.hostname
    starttls: TlsLevel = "may"  # to the downstream: none | may | encrypt | verify
    tls_policy: Mapping[str, TlsLevel] = field(default_factory=dict)  # downstream host -> level
    tls_ca_file: Path | None = None  # for "verify" (default: the system's CAs)
    # proxy mode: keep an idle downstream connection for the next transaction this long
    # (0 = a new connection for each); queue mode has queue.connection_reuse_s
    connection_reuse_s: float = 5.0

    def tls_level(self, host: str) -> TlsLevel:
        return self.tls_policy.get(host.lower(), self.starttls)


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    received: bool = True  # prepend Received: naming the gateway and the qid
    spam_headers: bool = True  # X-Spam-Score / X-Spam-Status / X-Spam-Symbols
    spam_header_prefix: str = "X-Spam-"
    subject_tag: str = "[SPAM]"  # used by the rewrite_subject action


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One entry of the ordered filter chain."""

    name: str
    module: str | None  # "pkg.mod:Class"; None = built-in/plugin/entry point by name
    timeout_s: float
    on_error: OnError
    settings: Mapping[str, Any]
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    stage: Stage = Stage.MESSAGE  # the earliest stage the rule may fire at
    if_any: tuple[str, ...] = ()
    if_all: tuple[str, ...] = ()
    unless_any: tuple[str, ...] = ()
    reply: Reply | None = None  # from "550 5.7.1 text" (reject/tempfail only)

    def matches(self, symbols: frozenset[str]) -> bool:
        if self.if_any and not any(s in symbols for s in self.if_any):
            return False
        if self.if_all and not all(s in symbols for s in self.if_all):
            return False
        return not any(s in symbols for s in self.unless_any)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score at or above which each action applies; None = never by score."""

    add_header: float | None = 5.0
    rewrite_subject: float | None = None
    quarantine: float | None = None
    tempfail: float | None = None
    reject: float | None = 15.0

    def action_for(self, score: float) -> tuple[Action, float | None]:
        best, at = Action.ACCEPT, None
        for action in (Action.ADD_HEADER, Action.REWRITE_SUBJECT, Action.QUARANTINE,
                       Action.TEMPFAIL, Action.REJECT):
            limit = getattr(self, action.value)
            if limit is not None and score >= limit:
                best, at = action, limit
        return best, at


@dataclass(frozen=True, slots=True)
class PolicyClass:
    """A set of recipient domains with their own scores, thresholds, rules and filter skips."""

    name: str
    domains: tuple[str, ...]
    scores: Mapping[str, float]
    thresholds: Thresholds
    rules: tuple[Rule, ...]
    skip_filters: frozenset[str]


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Store-and-forward delivery (relay.mode = "queue"): retries and lifetime."""

    min_backoff_s: float = 300.0
    max_backoff_s: float = 4000.0
    max_lifetime_s: float = 5 * 86400.0
    max_active: int = 100  # deliveries in flight at once
    max_per_destination: int = 20  # connections at once to one transport
    connection_reuse_s: float = 5.0  # keep an idle downstream connection this long (0 = never)
    scan_interval_s: float = 5.0  # how often due retries are looked for
    delay_warning_s: float = 0.0  # a "delayed" DSN after this long in the queue (0 = never)


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The DNS resolver (MX routing, SPF, DKIM, DMARC): which servers, how long to wait, the
    answer cache and the per-message lookup limit."""

    nameservers: tuple[tuple[str, int], ...] = ()  # (ip, port); empty = the system's resolv.conf
    timeout_s: float = 5.0  # the deadline of one query (all servers and retries included)
    cache_max_entries: int = 10000  # answers kept (least recently used dropped first); 0 = no cache
    cache_max_ttl_s: float = 86400.0  # no answer is kept longer than this
    cache_min_ttl_s: float = 0.0  # nor shorter than this (0 = the record's own TTL)
    max_queries_per_message: int = 100  # lookups one message may cause (DnsResolver.limited)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    directory: Path = Path("spool")  # DATA streams into spool/incoming while it arrives


@dataclass(frozen=True, slots=True)
class QuarantineConfig:
    """Quarantined mail lives in the spool's hold/ area, indexed in spool/quarantine.db
    (gateway/quarantine.py); it is deleted ``retention_s`` after it was quarantined, checked
    every ``expire_interval_s`` by the running gateway."""

    retention_s: float = 30 * 86400.0
    expire_interval_s: float = 600.0


@dataclass(frozen=True)
class Policy:
    source: str  # the file it came from
    hostname: str
    workers: int  # SMTP+delivery processes; 0 = one per CPU
    listeners: tuple[Listener, ...]
    tls: TlsConfig
    limits: Limits
    relay: RelayConfig
    accepted_domains: frozenset[str]
    trusted_networks: tuple[Network, ...]
    headers: HeadersConfig
    spool: SpoolConfig
    queue: QueueConfig
    quarantine: QuarantineConfig
    filters: tuple[FilterSpec, ...]
    plugin_dirs: tuple[Path, ...]
    default_class: PolicyClass
    classes: tuple[PolicyClass, ...] = ()
    dns: DnsConfig = DnsConfig()
    # the policy file's directory: relative paths in it are relative to this (the loader
    # resolves its own; filters resolve theirs with Services.path)
    base_dir: Path = Path(".")
    # where the state paths the file leaves out go (spool, Maildir, Bayes store); None: the
    # working directory (gateway/policy/locate.py state_dir)
    state_dir: Path | None = None

    def class_for_domain(self, domain: str) -> PolicyClass:
        d = domain.lower()
        for cls in self.classes:
            if d in cls.domains:
                return cls
        return self.default_class

    def class_named(self, name: str) -> PolicyClass:
        for cls in self.classes:
            if cls.name == name:
                return cls
        return self.default_class

    def is_trusted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted_networks)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.accepted_domains
