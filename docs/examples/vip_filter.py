"""VIP senders: mark mail from listed envelope senders with the ``VIP_SENDER`` symbol and an
``X-VIP`` header, so the policy can score it, whitelist it with a rule, or route on the header.

The example filter of docs/writing-filters.md. Enable it with::

    [[filters]]
    name = "vip"
    module = "vip_filter:VipFilter"       # this file must be importable (PYTHONPATH)
    senders = ["ceo@partner.test", "@board.partner.test"]
    header = "X-VIP"                      # optional, this is the default

Settings: ``senders`` (required; addresses, or ``@domain`` for every sender of a domain) and
``header`` (the header field to add; default ``X-VIP``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.filterapi import (
    AddHeader,
    ConfigError,
    Filter,
    FilterContext,
    Result,
    Symbol,
)
from gateway.services import Services
from gateway.settings import check_keys, opt_str, str_list

FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 2.2: printable ASCII except ":"


class VipFilter(Filter):
    name = "vip"

    def __init__(self, addresses: frozenset[str], domains: frozenset[str], header: str) -> None:
        self.addresses = addresses
        self.domains = domains
        self.header = header

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> VipFilter:
        check_keys(cfg, {"senders", "header"})  # a typo is an error, not a silent default
        if "senders" not in cfg:
            raise ConfigError("senders", "is required (addresses or @domain)")
        addresses: set[str] = set()
        domains: set[str] = set()
        for entry in str_list(cfg, "senders"):
            local, at, domain = entry.lower().rpartition("@")
            if not at or not domain:
                raise ConfigError("senders", f"{entry!r} is not an address or @domain")
            if local:
                addresses.add(f"{local}@{domain}")
            else:
                domains.add(domain)
        header = opt_str(cfg, "header") or "X-VIP"
        if not FIELD_NAME.match(header):
            raise ConfigError("header", f"{header!r} is not a header field name")
        return cls(frozenset(addresses), frozenset(domains), header)

    async def on_mail(self, ctx: FilterContext) -> Result:
        sender = ctx.sender
        if sender is None or sender.is_null:  # bounces (MAIL FROM:<>) are nobody's VIP
            return Result()
        addr = f"{sender.local.lower()}@{sender.domain_key}"
        if addr in self.addresses:
            matched = addr
        elif sender.domain_key in self.domains:
            matched = f"@{sender.domain_key}"
        else:
            return Result()
        return Result(symbols=(Symbol("VIP_SENDER", (sender.addr,)),),
                      edits=(AddHeader(self.header, "yes"),),
                      data={"matched": matched})
