"""Load a policy file (TOML, or YAML with the same schema) and validate it into a
:class:`~gateway.policy.schema.Policy`.

Every problem is collected, each naming the file, the key path and the reason
(``policies/strict.toml: limits.max_recipients: must be an integer >= 1``), and raised together as
one :class:`~gateway.errors.PolicyError`. Unknown keys are errors: a typo must not silently
fall back to a default.

A relative path written in a policy file (spool, Maildir and LMTP socket, TLS files, plugin
directories, and the filters' own files through ``Services.path``) is relative to the file's
directory, ``Policy.base_dir``. The defaults of keys left out (``spool``, ``maildir:Maildir``,
the Bayes ``bayes.db``) are in the state directory (gateway/policy/locate.py ``state_dir``:
``$MAILGATE_STATE_DIR``, /var/lib/mailgate for the system policy, else the working directory),
so the same policy file can be mounted read-only while the state goes to a volume.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from gateway.errors import PolicyError
from gateway.filterapi import Action, Stage
from gateway.mimebounds import HARD_MAX_DEPTH
from gateway.policy.locate import state_dir
from gateway.policy.schema import (
    DnsConfig,
    FilterSpec,
    HeadersConfig,
    Limits,
    Listener,
    Network,
    Policy,
    PolicyClass,
    QuarantineConfig,
    QueueConfig,
    RelayConfig,
    Rule,
    SpoolConfig,
    Thresholds,
    TlsConfig,
)
from gateway.relay.transport import Transport, parse_transport
from gateway.replies import Reply
from gateway.settings import did_you_mean

TOP_KEYS = {"server", "tls", "limits", "relay", "domains", "headers", "spool", "queue",
            "quarantine", "dns",
            "plugins",
            "filters", "scores", "actions", "rules", "classes"}
FILTER_KEYS = {"name", "module", "timeout_s", "on_error", "enabled"}
ON_ERROR = ("tempfail", "continue", "reject", "quarantine")
SYMBOL_RE = re.compile(r"^[A-Z0-9_]+$")
DOMAIN_RE = re.compile(r"^\.?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
REPLY_RE = re.compile(r"^([45]\d\d) ([45]\.\d{1,3}\.\d{1,3}) (\S.*)$")


class Checker:
    """Collects problems with their key paths while reading a nested mapping."""

    def __init__(self, source: str, base: Path | None = None,
                 state: Path | None = None) -> None:
        self.source = source
        self.base = base  # relative paths are relative to it (None: left as they are)
        self.state = state  # the defaults of state paths left out (None: the working dir)
        self.problems: list[str] = []

    def path(self, value: str | Path) -> Path:
        p = Path(value)
        return p if self.base is None or p.is_absolute() else self.base / p

    def state_path(self, default: Path) -> Path:
        return default if self.state is None or default.is_absolute() else self.state / default

    def error(self, path: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {path}: {reason}")

    def table(self, data: Any, path: str, allowed: set[str] | None) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            self.error(path, "must be a table")
            return {}
        out: dict[str, Any] = {}
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):  # YAML allows 1:, true:, null: as keys
                self.error(where, f"keys must be strings, got {key!r}")
            elif allowed is not None and key not in allowed:
                self.error(where, f"unknown key{did_you_mean(key, allowed)}")
            else:
                out[key] = value
        return out

    def number(self, data: Mapping[str, Any], key: str, path: str, default: float, *,
               minimum: float | None = None, exclusive: bool = False,
               integer: bool = False, maximum: float | None = None) -> Any:
        if key not in data:
            return default
        v = data[key]
        kind = "an integer" if integer else "a number"
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok:
            self.error(f"{path}.{key}", f"must be {kind}, got {v!r}")
            return default
        if isinstance(v, float) and not math.isfinite(v):  # TOML's nan and inf
            self.error(f"{path}.{key}", f"must be a finite number, got {v!r}")
            return default
        if minimum is not None and (v <= minimum if exclusive else v < minimum):
            self.error(f"{path}.{key}", f"must be {kind} {'>' if exclusive else '>='} {minimum:g}")
            return default
        if maximum is not None and v > maximum:
            self.error(f"{path}.{key}", f"must be {kind} <= {maximum:g}, got {v!r}")
            return default
        return v

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        v = data.get(key, default)
        if not isinstance(v, bool):
            self.error(f"{path}.{key}", f"must be true or false, got {v!r}")
            return default
        return v

    def string(self, data: Mapping[str, Any], key: str, path: str, default: Any,
               choices: tuple[str, ...] | None = None,
               shape: tuple[re.Pattern[str], str] | None = None) -> Any:
        """``shape``: (a pattern the whole value must match, what it must be)."""
        if key not in data:
            return default
        v = data[key]
        if not isinstance(v, str) or not v:
            self.error(f"{path}.{key}", f"must be a non-empty string, got {v!r}")
            return default
        if choices and v not in choices:
            self.error(f"{path}.{key}", f"must be one of {', '.join(choices)}; got {v!r}")
            return default
        if shape and not shape[0].fullmatch(v):
            self.error(f"{path}.{key}", f"must be {shape[1]}, got {v!r}")
            return default
        return v

    def strings(self, data: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        v = data.get(key, [])
        if isinstance(v, str) or not isinstance(v, list) or not all(
                isinstance(x, str) for x in v):
            self.error(f"{path}.{key}", "must be a list of strings")
            return ()
        return tuple(v)

    def convert(self, path: str, value: Any, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(value)
        except (ValueError, TypeError) as e:
            self.error(path, str(e))
            return None


MAX_WORKERS = 1024  # processes forked at start: more is a typo, not a machine

# Values that go into the SMTP dialogue or into header fields: no white space, no CR/LF
HOST_NAME = (re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]"),
             "a host name (letters, digits, '-', '.') or an address literal like [192.0.2.1]")
FIELD_NAME = (re.compile(r"[!-9;-~]+"),
              "the start of a header field name: printable ASCII without ':' or spaces")
ONE_LINE = (re.compile(r"[^\x00-\x1f\x7f]+"), "one line of text (no control characters)")


def read_policy_data(path: Path) -> dict[str, Any]:
    """Parse the file by its extension; syntax errors become a PolicyError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PolicyError([f"{path}: cannot read: {e.strerror or e}"]) from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise PolicyError([f"{path}: YAML syntax: {_yaml_error(e)}"]) from None
    else:
        try:  # utf-8-sig: a byte-order mark (as Windows editors write) is skipped, as YAML does
            data = tomllib.loads(raw.decode("utf-8-sig"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise PolicyError([f"{path}: TOML syntax: {e}"]) from None
    if not isinstance(data, dict):
        raise PolicyError([f"{path}: the top level must be a table"])
    return data


def _yaml_error(e: Exception) -> str:
    """PyYAML's multi-line message (with a quoted excerpt) as one line:
    ``PROBLEM (at line L, column C) CONTEXT (at line L, column C)``."""
    import yaml

    if not isinstance(e, yaml.MarkedYAMLError) or e.problem is None:
        return " ".join(str(e).split())

    def at(mark: Any) -> str:
        return f" (at line {mark.line + 1}, column {mark.column + 1})" if mark else ""

    text = f"{e.problem}{at(e.problem_mark)}"
    if e.context:
        text += f" {e.context}{at(e.context_mark)}"
    return " ".join(text.split())


LISTEN_ENV = "MAILGATE_LISTEN"  # set by `mailgate run --listen`; the container image sets it


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    return listen_override(parse_policy(read_policy_data(path), str(path), policy_dir(path),
                                        state_dir(path)))


def policy_dir(path: str | Path) -> Path:
    """The directory relative paths in the policy file at ``path`` are relative to."""
    return Path(os.path.abspath(path)).parent


def listen_override(policy: Policy) -> Policy:
    """``$MAILGATE_LISTEN`` (comma-separated ``host:port``), when set, replaces
    ``server.listen``: a container listens on all its interfaces with the policy file mounted
    as it is, and every worker and reload sees the same addresses."""
    text = os.environ.get(LISTEN_ENV, "").strip()
    if not text:
        return policy
    c = Checker(LISTEN_ENV)
    listeners = tuple(x for x in (c.convert("listen", a.strip(), _listener)
                                  for a in text.split(",") if a.strip()) if x is not None)
    if c.problems:
        raise PolicyError(c.problems)
    return replace(policy, listeners=listeners)


def parse_policy(data: Mapping[str, Any], source: str, base: Path | None = None,
                 state: Path | None = None) -> Policy:
    """``base``: the directory relative paths are relative to (the policy file's); None
    leaves them relative to the working directory. ``state``: where the state paths left out
    go (gateway/policy/locate.py ``state_dir``); None: the working directory."""
    policy, problems = parse_policy_collecting(data, source, base, state)
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy_collecting(path: str | Path) -> tuple[Policy, list[str]]:
    """The policy and its problems (a file that cannot be read or parsed still raises)."""
    path = Path(path)
    return parse_policy_collecting(read_policy_data(path), str(path), policy_dir(path),
                                   state_dir(path))


def parse_policy_collecting(data: Mapping[str, Any], source: str, base: Path | None = None,
                            state: Path | None = None) -> tuple[Policy, list[str]]:
    """The policy with the default in place of every invalid value, and the problems found:
    the caller can go on checking (the filters' settings, gateway/policy/lint.py) so that one
    run reports everything. A policy with problems must never be used."""
    c = Checker(source, base, state)
    top = c.table(data, "", TOP_KEYS)

    server = c.table(top.get("server"), "server", {"hostname", "listen", "workers"})
    workers = c.number(server, "workers", "server", 0, minimum=0, integer=True,
                       maximum=MAX_WORKERS)
    hostname = c.string(server, "hostname", "server", "mailgate.localdomain", shape=HOST_NAME)
    listeners = tuple(
        x for x in (c.convert(f"server.listen[{i}]", s, _listener)
                    for i, s in enumerate(c.strings(server, "listen", "server")
                                          if "listen" in server else ("127.0.0.1:2525",)))
        if x is not None)
    if "listen" in server and not listeners and not c.problems:
        c.error("server.listen", "needs at least one address")

    tls_t = c.table(top.get("tls"), "tls", {"cert_file", "key_file"})
    cert = c.string(tls_t, "cert_file", "tls", None)
    key = c.string(tls_t, "key_file", "tls", None)
    if bool(cert) != bool(key):
        c.error("tls", "cert_file and key_file go together")
    for k, v in (("cert_file", cert), ("key_file", key)):
        if v and not c.path(v).is_file():
            c.error(f"tls.{k}", f"no such file: {c.path(v)}")
    tls = TlsConfig(c.path(cert) if cert else None, c.path(key) if key else None)

    limits = _limits(c, top.get("limits"))
    relay = _relay(c, top.get("relay"))

    domains = c.table(top.get("domains"), "domains", {"accepted", "trusted_networks"})
    accepted = []
    for i, d in enumerate(c.strings(domains, "accepted", "domains")):
        d = d.lower().rstrip(".")
        if not DOMAIN_RE.match(d) or d.startswith("."):
            c.error(f"domains.accepted[{i}]", f"not a domain name: {d!r}")
        accepted.append(d)
    trusted: list[Network] = []
    for i, n in enumerate(c.strings(domains, "trusted_networks", "domains")):
        net = c.convert(f"domains.trusted_networks[{i}]", n,
                        lambda s: ipaddress.ip_network(s, strict=False))
        if net is not None:
            trusted.append(net)

    hdr = c.table(top.get("headers"), "headers",
                  {f.name for f in fields(HeadersConfig)})
    headers = HeadersConfig(
        received=c.boolean(hdr, "received", "headers", True),
        spam_headers=c.boolean(hdr, "spam_headers", "headers", True),
        spam_header_prefix=c.string(hdr, "spam_header_prefix", "headers", "X-Spam-",
                                    shape=FIELD_NAME),
        subject_tag=c.string(hdr, "subject_tag", "headers", "[SPAM]", shape=ONE_LINE),
    )
    queue = _queue(c, top.get("queue"))
    dns = _dns(c, top.get("dns"))
    sp = c.table(top.get("spool"), "spool", {"directory"})
    spool_dir = c.string(sp, "directory", "spool", None)
    spool = SpoolConfig(c.path(spool_dir) if spool_dir
                        else c.state_path(SpoolConfig().directory))
    quarantine = _quarantine(c, top.get("quarantine"))
    plugins = c.table(top.get("plugins"), "plugins", {"dirs"})
    plugin_dirs = tuple(c.path(p) for p in c.strings(plugins, "dirs", "plugins"))
    for i, p in enumerate(plugin_dirs):
        if not p.is_dir():
            c.error(f"plugins.dirs[{i}]", f"no such directory: {p}")

    filters = _filters(c, top.get("filters"))
    names = {f.name for f in filters}
    scores = _scores(c, top.get("scores"), "scores")
    thresholds = _thresholds(c, top.get("actions"), "actions", Thresholds())
    rules = _rules(c, top.get("rules"), "rules")
    default_class = PolicyClass("default", (), scores, thresholds, rules, frozenset())
    classes = _classes(c, top.get("classes"), default_class, names, set(accepted))

    return Policy(
        source=source, hostname=hostname, workers=workers, listeners=listeners, tls=tls, limits=limits,
        relay=relay, accepted_domains=frozenset(accepted), trusted_networks=tuple(trusted),
        headers=headers, spool=spool, queue=queue, quarantine=quarantine, filters=filters, plugin_dirs=plugin_dirs,
        default_class=default_class, classes=classes, dns=dns,
        base_dir=base if base is not None else Path("."), state_dir=state,
    ), c.problems


def _listener(text: str) -> Listener:
    if text.startswith("["):  # [IPv6]:port
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"must be [IPv6 address]:port, got {text!r}")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be host:port (port 0 picks a free port), got {text!r}")
    ipaddress.ip_address(host) if host[0].isdigit() or ":" in host else None
    return Listener(host, int(port))


_LIMITS_ZERO_IS_OFF = {"min_data_rate_bytes_per_s"}  # integer limits where 0 turns it off


def _limits(c: Checker, data: Any) -> Limits:
    t = c.table(data, "limits", {f.name for f in fields(Limits)})
    d = Limits()
    values: dict[str, Any] = {}
    for f in fields(Limits):
        default = getattr(d, f.name)
        if f.name == "bare_lf":
            values[f.name] = c.string(t, "bare_lf", "limits", default, ("reject", "normalize"))
        elif isinstance(default, int):
            values[f.name] = c.number(t, f.name, "limits", default, integer=True,
                                      minimum=0 if f.name in _LIMITS_ZERO_IS_OFF else 1)
        else:
            values[f.name] = float(c.number(t, f.name, "limits", default, minimum=0,
                                            exclusive=True))
    if values["max_line_bytes"] < 80:
        c.error("limits.max_line_bytes", "must be an integer >= 80 (RFC 5321 requires 1000)")
    if values["max_command_line_bytes"] < 512:
        c.error("limits.max_command_line_bytes", "must be an integer >= 512 (RFC 5321 4.5.3.1.4)")
    if values["max_mime_depth"] > HARD_MAX_DEPTH:  # the stdlib's parser recurses per level
        c.error("limits.max_mime_depth", f"must be an integer from 1 to {HARD_MAX_DEPTH}")
    return Limits(**values)


def _queue(c: Checker, data: Any) -> QueueConfig:
    t = c.table(data, "queue", {f.name for f in fields(QueueConfig)})
    d = QueueConfig()
    def num(key: str, integer: bool = False) -> Any:
        v = c.number(t, key, "queue", getattr(d, key), minimum=0, exclusive=True,
                     integer=integer)
        return v if integer else float(v)

    q = QueueConfig(min_backoff_s=num("min_backoff_s"), max_backoff_s=num("max_backoff_s"),
                    max_lifetime_s=num("max_lifetime_s"),
                    max_active=num("max_active", integer=True),
                    max_per_destination=num("max_per_destination", integer=True),
                    connection_reuse_s=float(c.number(t, "connection_reuse_s", "queue",
                                                      d.connection_reuse_s, minimum=0)),
                    scan_interval_s=num("scan_interval_s"),
                    delay_warning_s=float(c.number(t, "delay_warning_s", "queue",
                                                   d.delay_warning_s, minimum=0)))
    if q.max_backoff_s < q.min_backoff_s:
        c.error("queue.max_backoff_s", "must be >= queue.min_backoff_s")
    return q


def _quarantine(c: Checker, data: Any) -> QuarantineConfig:
    t = c.table(data, "quarantine", {f.name for f in fields(QuarantineConfig)} | {"directory"})
    if "directory" in t:
        c.error("quarantine.directory", "no longer used: quarantined mail is kept in the spool "
                "(spool.directory/hold, indexed in spool.directory/quarantine.db)")
    d = QuarantineConfig()
    return QuarantineConfig(*(float(c.number(t, k, "quarantine", getattr(d, k), minimum=0,
                                             exclusive=True))
                              for k in ("retention_s", "expire_interval_s")))


def _dns(c: Checker, data: Any) -> DnsConfig:
    t = c.table(data, "dns", {f.name for f in fields(DnsConfig)})
    d = DnsConfig()
    servers = []
    for i, text in enumerate(c.strings(t, "nameservers", "dns")):
        ns = c.convert(f"dns.nameservers[{i}]", text, parse_nameserver)
        if ns is not None:
            servers.append(ns)
    cfg = DnsConfig(
        nameservers=tuple(servers),
        timeout_s=float(c.number(t, "timeout_s", "dns", d.timeout_s, minimum=0, exclusive=True)),
        cache_max_entries=c.number(t, "cache_max_entries", "dns", d.cache_max_entries,
                                   minimum=0, integer=True),
        cache_max_ttl_s=float(c.number(t, "cache_max_ttl_s", "dns", d.cache_max_ttl_s,
                                       minimum=0)),
        cache_min_ttl_s=float(c.number(t, "cache_min_ttl_s", "dns", d.cache_min_ttl_s,
                                       minimum=0)),
        max_queries_per_message=c.number(t, "max_queries_per_message", "dns",
                                         d.max_queries_per_message, minimum=1, integer=True))
    if cfg.cache_min_ttl_s > cfg.cache_max_ttl_s:
        c.error("dns.cache_min_ttl_s", "must be <= dns.cache_max_ttl_s")
    return cfg


def _transport(c: Checker, path: str, text: Any) -> Transport | None:
    tr: Transport | None = c.convert(path, text, parse_transport)
    return _located(c, tr)


def _located(c: Checker, tr: Transport | None) -> Transport | None:
    """``tr`` with its path (Maildir, LMTP socket) relative to the policy's directory."""
    if tr is None or tr.path is None:
        return tr
    return replace(tr, path=c.path(tr.path))


def _relay(c: Checker, data: Any) -> RelayConfig:
    t = c.table(data, "relay", {"mode", "downstream", "transport", "connect_timeout_s",
                                "command_timeout_s", "data_timeout_s", "helo_name", "starttls",
                                "tls_policy", "tls_ca_file", "connection_reuse_s"})
    levels = ("none", "may", "encrypt", "verify")
    tls_policy = {}
    for host, level in c.table(t.get("tls_policy"), "relay.tls_policy", None).items():
        if level not in levels:
            c.error(f"relay.tls_policy.{host}", f"must be one of {', '.join(levels)}; "
                    f"got {level!r}")
        else:
            tls_policy[host.lower()] = level
    ca_file = c.string(t, "tls_ca_file", "relay", None)
    if ca_file and not c.path(ca_file).is_file():
        c.error("relay.tls_ca_file", f"no such file: {c.path(ca_file)}")
    d = RelayConfig()
    mode = c.string(t, "mode", "relay", "queue", ("proxy", "queue"))
    downstream = d.downstream  # the default Maildir is state: in the state directory
    if downstream.path is not None:
        downstream = replace(downstream, path=c.state_path(downstream.path))
    if "downstream" in t:
        downstream = _transport(c, "relay.downstream", t["downstream"]) or d.downstream
    by_domain: dict[str, Transport] = {}
    for dom, spec in c.table(t.get("transport"), "relay.transport", None).items():
        tr = _transport(c, f"relay.transport.{dom}", spec)
        if not DOMAIN_RE.match(dom.lower()):
            c.error(f"relay.transport.{dom}", "key must be a domain (or .domain for subdomains)")
        if tr is not None:
            by_domain[dom.lower()] = tr
    if mode == "proxy":  # one lockstep transaction has one downstream; MX routing needs the queue
        why = 'mx routing needs relay.mode = "queue"'
        if downstream.kind == "mx":
            c.error("relay.downstream", why)
        for dom, tr in by_domain.items():
            if tr.kind == "mx":
                c.error(f"relay.transport.{dom}", why)
    return RelayConfig(
        mode=mode, downstream=downstream, transport=by_domain,
        connect_timeout_s=c.number(t, "connect_timeout_s", "relay", d.connect_timeout_s,
                                   minimum=0, exclusive=True),
        command_timeout_s=c.number(t, "command_timeout_s", "relay", d.command_timeout_s,
                                   minimum=0, exclusive=True),
        data_timeout_s=c.number(t, "data_timeout_s", "relay", d.data_timeout_s,
                                minimum=0, exclusive=True),
        helo_name=c.string(t, "helo_name", "relay", None, shape=HOST_NAME),
        starttls=c.string(t, "starttls", "relay", "may", levels),
        tls_policy=tls_policy, tls_ca_file=c.path(ca_file) if ca_file else None,
        connection_reuse_s=float(c.number(t, "connection_reuse_s", "relay",
                                          d.connection_reuse_s, minimum=0)),
    )


def _filters(c: Checker, data: Any) -> tuple[FilterSpec, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        c.error("filters", "must be an array of tables ([[filters]])")
        return ()
    out: list[FilterSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            c.error(f"filters[{i}]", "must be a table")
            continue
        name = entry.get("name")
        if name is None:  # `nme = "rcpt"`: that key, as an unknown key close to a known one
            near = [k for k in entry if isinstance(k, str) and did_you_mean(k, {"name"})]
            for k in near:
                c.error(f"filters[{i}].{k}", f"unknown key{did_you_mean(k, {'name'})}")
            if not near:
                c.error(f"filters[{i}].name", "missing: every [[filters]] entry needs one")
            continue
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            c.error(f"filters[{i}].name", f"must be a lowercase identifier like 'rcpt', "
                                          f"got {name!r}")
            continue
        path = f"filters.{name}"
        if name in seen:
            c.error(path, "appears twice in the chain")
        seen.add(name)
        module = c.string(entry, "module", path, None)
        if module is not None and not re.match(r"^[\w.]+:\w+$", module):
            c.error(f"{path}.module", f"must be 'package.module:Class', got {module!r}")
        out.append(FilterSpec(
            name=name, module=module,
            timeout_s=float(c.number(entry, "timeout_s", path, 10.0, minimum=0, exclusive=True)),
            on_error=c.string(entry, "on_error", path, "tempfail", ON_ERROR),
            enabled=c.boolean(entry, "enabled", path, True),
            settings={k: v for k, v in entry.items() if k not in FILTER_KEYS},
        ))
    return tuple(out)


def _scores(c: Checker, data: Any, path: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for sym, v in c.table(data, path, None).items():
        if not SYMBOL_RE.match(sym):
            c.error(f"{path}.{sym}", "symbol names are UPPER_CASE letters, digits and _")
        if isinstance(v, bool) or not isinstance(v, int | float):
            c.error(f"{path}.{sym}", f"must be a number, got {v!r}")
            continue
        if not math.isfinite(v):  # a nan score makes every total nan: no action would fire
            c.error(f"{path}.{sym}", f"must be a finite number, got {v!r}")
            continue
        out[sym] = float(v)
    return out


def _thresholds(c: Checker, data: Any, path: str, base: Thresholds) -> Thresholds:
    t = c.table(data, path, {f.name for f in fields(Thresholds)})
    values: dict[str, float | None] = {}
    for f in fields(Thresholds):
        v = t.get(f.name, getattr(base, f.name))
        if v is False:
            v = None
        elif v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                or not math.isfinite(v)):
            c.error(f"{path}.{f.name}", f"must be a score, or false to turn it off; got {v!r}")
            v = getattr(base, f.name)
        values[f.name] = None if v is None else float(v)
    return Thresholds(**values)


def parse_reply(text: str) -> Reply:
    m = REPLY_RE.match(text)
    if not m:
        raise ValueError(f"must look like '550 5.7.1 text', got {text!r}")
    code, status, msg = int(m.group(1)), m.group(2), m.group(3)
    if status[0] != str(code)[0]:
        raise ValueError(f"enhanced status {status} does not match code {code}")
    return Reply(code, status, msg)


def _rules(c: Checker, data: Any, path: str) -> tuple[Rule, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        c.error(path, "must be an array of tables ([[rules]])")
        return ()
    out: list[Rule] = []
    actions = tuple(a.value for a in Action)
    stages = tuple(s.value for s in Stage)
    for i, entry in enumerate(data):
        rp = f"{path}[{i}]"
        t = c.table(entry, rp, {"name", "action", "stage", "if_any", "if_all", "unless_any",
                                "reply"})
        name = c.string(t, "name", rp, f"rule{i + 1}")
        rp = f"{path}.{name}"
        if any(r.name == name for r in out):
            c.error(rp, "appears twice: rule names must be unique (the log's by=rule:NAME "
                        "names the rule that decided)")
        if "action" not in t:
            c.error(f"{rp}.action", "is required")
        action = Action(c.string(t, "action", rp, "accept", actions))
        stage = Stage(c.string(t, "stage", rp, "message", stages))
        lists = {k: c.strings(t, k, rp) for k in ("if_any", "if_all", "unless_any")}
        if not lists["if_any"] and not lists["if_all"]:
            c.error(rp, "needs if_any or if_all")
        for k, syms in lists.items():
            for s in syms:
                if not SYMBOL_RE.match(s):
                    c.error(f"{rp}.{k}", f"not a symbol name: {s!r}")
        reply_text = c.string(t, "reply", rp, None)
        reply = None
        if reply_text is not None:
            reply = r = c.convert(f"{rp}.reply", reply_text, parse_reply)
            if r is not None and action not in (Action.REJECT, Action.TEMPFAIL):
                c.error(f"{rp}.reply", "only reject and tempfail rules carry a reply")
            elif r is not None and (r.code >= 500) != (action is Action.REJECT):
                c.error(f"{rp}.reply", f"a {action.value} rule needs a "
                        f"{'5xx' if action is Action.REJECT else '4xx'} reply")
        if stage is not Stage.MESSAGE and not action.refuses and action is not Action.ACCEPT:
            c.error(f"{rp}.stage", f"{action.value} can only happen at the message stage")
        out.append(Rule(name=name, action=action, stage=stage, reply=reply, **lists))
    return tuple(out)


def _classes(c: Checker, data: Any, default: PolicyClass, filter_names: set[str],
             accepted: set[str]) -> tuple[PolicyClass, ...]:
    out: list[PolicyClass] = []
    claimed: dict[str, str] = {}
    for name, entry in c.table(data, "classes", None).items():
        p = f"classes.{name}"
        t = c.table(entry, p, {"domains", "scores", "actions", "rules", "skip_filters"})
        doms = tuple(d.lower().rstrip(".") for d in c.strings(t, "domains", p))
        if not doms:
            c.error(f"{p}.domains", "needs at least one recipient domain")
        for d in doms:
            if d in claimed:
                c.error(f"{p}.domains", f"{d} is already in class {claimed[d]}")
            claimed[d] = name
            if d not in accepted:
                c.error(f"{p}.domains", f"{d} is not in domains.accepted")
        skips = frozenset(c.strings(t, "skip_filters", p))
        for s in sorted(skips - filter_names):
            c.error(f"{p}.skip_filters", f"no filter named {s!r} in the chain"
                                         f"{did_you_mean(s, filter_names)}")
        scores = {**default.scores, **_scores(c, t.get("scores"), f"{p}.scores")}
        thresholds = _thresholds(c, t.get("actions"), f"{p}.actions", default.thresholds)
        rules = _rules(c, t.get("rules"), f"{p}.rules") + default.rules
        out.append(PolicyClass(name, doms, scores, thresholds, rules, skips))
    return tuple(out)


def parse_nameserver(text: str) -> tuple[str, int]:
    """``IP``, ``IP:PORT``, ``IPv6`` or ``[IPv6]:PORT`` (an address: the resolver's own name
    cannot be looked up)."""
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, sep, port = host[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be IP, IP:PORT or [IPv6]:PORT, got {text!r}")
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"must be an IP address (optionally :PORT), got {text!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)
