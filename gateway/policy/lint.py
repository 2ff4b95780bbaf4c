"""Mis-deployment checks on a policy that parses: settings that are each valid but together
leave a door open or can never take effect. ``check-policy`` prints them, ``run`` logs them at
start and at every reload (gateway/app.py ``load_engine``).

Errors (the policy is refused, exit 1) are for what can never work as written; warnings (printed,
exit 0) for what works but is unsafe or probably a mistake:

* an accepted domain that no recipient-checking filter covers: every address there is
  accepted, unknown users too → warning (unless the downstream answers each RCPT itself: proxy
  mode to an SMTP/LMTP downstream);
* recipient-filter entries for a domain that is not accepted → error without
  ``trusted_networks`` (the core refuses such recipients as relay before any filter runs),
  warning with them (only relayed mail reaches the entry);
* a ``relay.transport`` route that no recipient can take (not accepted, no trusted networks)
  → error;
* an ``[actions]`` threshold that can never fire because a more severe action written in the
  same table starts at or below it (the most severe action reached wins) → error;
* no accepted domain and no trusted network (an empty file, say): every recipient but
  ``<postmaster>`` is refused as relay → warning.

A filter declares what it checks with a ``recipient_coverage``
(:class:`~gateway.filterapi.RecipientCoverage`); ``rcpt`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gateway.filterapi import RecipientCoverage
from gateway.policy.schema import Policy, Thresholds
from gateway.relay.transport import transport_for

# least to most severe: the most severe action whose threshold the score reaches applies
SEVERITY = tuple(f.name for f in fields(Thresholds))


@dataclass(frozen=True, slots=True)
class Findings:
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def lint(policy: Policy, data: Mapping[str, Any], filters: Mapping[str, Any], *,
         complete: bool = True) -> Findings:
    """``data``: the file as parsed (to tell the keys written from the defaults); ``filters``:
    the chain's instances by name; ``complete``: False when some could not be built (what
    those cover is unknown: the accepted domains' coverage is then not judged)."""
    errors: list[str] = []
    warnings: list[str] = []
    src = policy.source
    if not policy.accepted_domains and not policy.trusted_networks:
        warnings.append("domains.accepted: warning: no domain is accepted and "
                        "domains.trusted_networks is empty, so every recipient but <postmaster> "
                        "is refused as relay (550 5.7.1); list your domains in domains.accepted")
    _coverage(policy, filters, complete, errors, warnings)
    _routes(policy, errors)
    _thresholds(data, errors)
    return Findings(tuple(f"{src}: {e}" for e in errors),
                    tuple(f"{src}: {w}" for w in warnings))


def _coverage(policy: Policy, filters: Mapping[str, Any], complete: bool, errors: list[str],
              warnings: list[str]) -> None:
    covering = {name: cov for name, f in filters.items()
                if isinstance(cov := getattr(f, "recipient_coverage", None), RecipientCoverage)}
    relay = policy.relay
    for domain in sorted(policy.accepted_domains) if complete else ():
        skipped = policy.class_for_domain(domain).skip_filters
        if any(cov.covers(domain) for name, cov in covering.items() if name not in skipped):
            continue
        downstream = transport_for(domain, relay.downstream, relay.transport)
        if relay.mode == "proxy" and downstream.kind in ("smtp", "lmtp"):
            continue  # each RCPT is answered by the downstream, in lockstep
        skip = [n for n in covering if n in skipped]
        why = (f"its class skips {', '.join(skip)}" if skip else
               "no recipient filter (rcpt) lists it" if covering else
               "the chain has no recipient filter (rcpt)")
        warnings.append(
            f"domains.accepted: warning: {domain}: {why}, so every address @{domain} is "
            f"accepted, unknown users too" + (
                " (queue mode: the downstream's refusal becomes a bounce to a possibly forged "
                "sender)" if relay.mode == "queue" and downstream.kind != "maildir" else "")
            + f"; list its users in rcpt's recipients or recipient_map_file, or \"@{domain}\" "
            f"to accept the whole domain on purpose")
    for name, cov in covering.items():
        for domain in sorted(cov.named - policy.accepted_domains):
            if policy.trusted_networks:
                warnings.append(f"filters.{name}: warning: {domain} is not in domains.accepted: "
                                f"only clients in domains.trusted_networks reach its entries")
            else:
                errors.append(f"filters.{name}: {domain} is not in domains.accepted: mail to "
                              f"it is refused as relay (550 5.7.1) before any filter runs, so "
                              f"its entries never apply; add {domain} to domains.accepted, or "
                              f"remove them")


def _routes(policy: Policy, errors: list[str]) -> None:
    if policy.trusted_networks:
        return  # relayed mail may take any route (outbound transports, MX routing)
    for key in sorted(policy.relay.transport):
        if key.startswith("."):
            if any(d.endswith(key) for d in policy.accepted_domains):
                continue
            target = f"no accepted domain is a subdomain of {key[1:]}"
        elif key in policy.accepted_domains:
            continue
        else:
            target = f"{key} is not in domains.accepted"
        errors.append(f"relay.transport.{key}: {target} and domains.trusted_networks is empty: "
                      f"no recipient can ever take this route; add the domain to "
                      f"domains.accepted, or remove the route")


def _thresholds(data: Mapping[str, Any], errors: list[str]) -> None:
    tables: list[tuple[str, Any]] = [("actions", data.get("actions"))]
    classes = data.get("classes")
    if isinstance(classes, Mapping):
        tables += [(f"classes.{name}.actions", c.get("actions"))
                   for name, c in classes.items() if isinstance(c, Mapping)]
    for path, table in tables:
        if not isinstance(table, Mapping):
            continue
        written = {k: float(v) for k, v in table.items() if k in SEVERITY
                   and isinstance(v, int | float) and not isinstance(v, bool)}
        for i, action in enumerate(SEVERITY):
            if action not in written:
                continue
            above = [(written[b], b) for b in SEVERITY[i + 1:]
                     if b in written and written[b] <= written[action]]
            if above:
                at, b = min(above)
                errors.append(f"{path}.{action}: can never fire: {b} starts at {at:g}, at or "
                              f"below {written[action]:g}, and the most severe action reached "
                              f"wins (every score >= {written[action]:g} gets {b}); raise {b}, "
                              f"lower {action}, or set it to false")
