"""The ``headers`` filter: RFC 5322 §3.6 sanity of the header section, reported as symbols.

Symbols: HEADERS_MISSING_FROM, HEADERS_MULTIPLE_FROM, HEADERS_BAD_FROM (no address, or one
without a local part or domain: no usable author domain), HEADERS_MISSING_DATE,
HEADERS_BAD_DATE, HEADERS_MISSING_MESSAGE_ID, HEADERS_DUPLICATE (options: the singleton fields
that occur more than once), HEADERS_EMPTY (no header at all, and nothing else said).

This filter owns these findings: the default rule file does not test Message-ID, Date or From
presence again, and ``dmarc`` reports a From it cannot use as DMARC_NO_FROM, one whose single
author domain stands beside an unusable part as DMARC_FROM_UNUSABLE_PART (both unscored, the
trace's explanation) — each finding is scored once.
"""

from __future__ import annotations

import email.utils
from collections import Counter
from collections.abc import Mapping
from typing import Any

from gateway.filterapi import Filter, FilterContext, Result, Symbol
from gateway.headeraddr import unusable_from
from gateway.services import Services
from gateway.settings import check_keys

# RFC 5322 3.6: fields that may occur at most once (From and Date exactly once).
SINGLETONS = ("date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id",
              "in-reply-to", "references", "subject")


class HeadersFilter(Filter):
    name = "headers"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> HeadersFilter:
        check_keys(cfg, set())
        return cls()

    async def on_message(self, ctx: FilterContext) -> Result:
        msg = ctx.message
        assert msg is not None
        if not msg.headers:
            return Result(symbols=(Symbol("HEADERS_EMPTY"),))
        counts = Counter(h.name.lower() for h in msg.headers)
        out: list[Symbol] = []
        froms = msg.get_all("From")
        if not froms:
            out.append(Symbol("HEADERS_MISSING_FROM"))
        elif len(froms) > 1:
            out.append(Symbol("HEADERS_MULTIPLE_FROM"))
        else:
            if unusable_from(froms[0]):
                out.append(Symbol("HEADERS_BAD_FROM", (froms[0][:100],)))
        dates = msg.get_all("Date")
        if not dates:
            out.append(Symbol("HEADERS_MISSING_DATE"))
        elif email.utils.parsedate_tz(dates[0]) is None:
            out.append(Symbol("HEADERS_BAD_DATE", (dates[0][:100],)))
        if not counts.get("message-id"):
            out.append(Symbol("HEADERS_MISSING_MESSAGE_ID"))
        dups = tuple(n for n in SINGLETONS if counts.get(n, 0) > 1 and n not in ("from",))
        if dups:
            out.append(Symbol("HEADERS_DUPLICATE", dups))
        return Result(symbols=tuple(out))

