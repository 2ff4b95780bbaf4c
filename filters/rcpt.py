"""The ``rcpt`` filter: refuse unknown users (550 5.1.1) in the domains a recipient list or map
file covers. Relay control (accepted domains, trusted networks, routing tricks) is not here: the
core enforces it for every policy, so removing a filter can never open the relay.

Settings: ``recipients`` (list of addresses, or ``@domain`` to accept a whole domain),
``recipient_map_file`` (one address or ``@domain`` per line, Postfix map style: a first column
key, anything after whitespace ignored, ``#`` comments), ``domains`` (extra domains this filter
is authoritative for: recipients there must be listed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.filterapi import (
    Action,
    ConfigError,
    Filter,
    FilterContext,
    RecipientCoverage,
    Result,
    Symbol,
    Verdict,
)
from gateway.replies import Reply
from gateway.services import Services
from gateway.settings import check_keys, opt_str, str_list

UNKNOWN = Symbol("RCPT_UNKNOWN")
KNOWN = Symbol("RCPT_KNOWN")


def _read_map(path: Path) -> list[tuple[int, str]]:
    """The map's keys (the first word of each line, as in a Postfix map) with their line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("recipient_map_file", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("recipient_map_file", f"{path}: not UTF-8 text ({e.reason} at "
                                                f"byte {e.start})") from None
    keys = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append((lineno, line.split()[0]))
    return keys


class RcptFilter(Filter):
    name = "rcpt"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    def __init__(self, addresses: frozenset[str], whole_domains: frozenset[str],
                 domains: frozenset[str]) -> None:
        self.addresses = addresses
        self.whole_domains = whole_domains
        self.domains = domains  # domains where an unlisted recipient is unknown
        # for check-policy: accepted domains it does not cover accept every address
        self.recipient_coverage = RecipientCoverage(domains, whole_domains)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> RcptFilter:
        check_keys(cfg, {"recipients", "recipient_map_file", "domains"})
        entries = [("recipients", "", e) for e in str_list(cfg, "recipients")]
        map_file = opt_str(cfg, "recipient_map_file")
        if map_file:
            entries += [("recipient_map_file", f"{map_file}:{n}: ", e)
                        for n, e in _read_map(services.path(map_file))]
        addresses, whole = set(), set()
        bad: list[tuple[str, str]] = []  # every bad entry, reported together
        for key, where, e in entries:
            local, at, domain = e.lower().rpartition("@")
            if not at or not domain:
                bad.append((key, f"{where}{e!r} is not an address or @domain"))
            elif local:
                addresses.add(f"{local}@{domain}")
            else:
                whole.add(domain)
        if bad:
            raise ConfigError(*bad[0], more=tuple(bad[1:20]))
        domains = {a.rpartition("@")[2] for a in addresses}
        domains |= {d.lower() for d in str_list(cfg, "domains")}
        return cls(frozenset(addresses), frozenset(whole), frozenset(domains - whole))

    async def on_rcpt(self, ctx: FilterContext) -> Result:
        rcpt = ctx.rcpt
        if rcpt is None or not rcpt.domain:  # <postmaster> is always accepted
            return Result(symbols=(KNOWN,))
        domain = rcpt.domain_key
        if domain in self.whole_domains:
            return Result(symbols=(KNOWN,))
        if domain not in self.domains:
            return Result()
        if f"{rcpt.local.lower()}@{domain}" in self.addresses:
            return Result(symbols=(KNOWN,))
        return Result(
            symbols=(Symbol(UNKNOWN.name, (rcpt.addr,)),),
            verdict=Verdict(Action.REJECT,
                            Reply(550, "5.1.1", f"<{rcpt.addr}>: Recipient address rejected: "
                                                "User unknown"), "unknown recipient"))
