"""The ``mime`` filter: reports the structural bounds a message's MIME parse met
(:mod:`gateway.mimebounds`, set by ``[limits] max_mime_*``) and, by default, refuses the
message for good.

Symbols (option: what was exceeded, e.g. ``more than 50 levels``):

* ``MIME_TOO_DEEP`` — containers (``multipart/*``, ``message/*``) nested deeper than
  ``limits.max_mime_depth``; the deeper content was read as one opaque part.
* ``MIME_TOO_MANY_PARTS`` — more MIME entities than ``limits.max_mime_parts``; the rest were
  read but not kept (nor checked by any content filter).
* ``MIME_TOO_MANY_HEADERS`` — a header block with more fields than ``limits.max_mime_headers``.
* ``MIME_TOO_MANY_ENCODED_WORDS`` — more RFC 2047 encoded words than
  ``limits.max_mime_encoded_words``; the rest were left undecoded.
* ``MIME_AMBIGUOUS`` — an entity's structure reads two ways (several different Content-Type
  headers, a multipart naming several different boundaries): mail clients differ on which
  wins, so what one shows as an attachment the checks may have read as text.

Such a message cannot be fully checked, and trying again will not change that: with
``action = "reject"`` (the default) a message carrying any symbol of ``action_on`` (default:
all five) is refused with ``554 5.6.0`` (RFC 3463 X.6.0, other or undefined media error; the
code Postfix gives for its ``mime_nesting_limit``), a permanent answer, so the sender's MTA
bounces it instead of retrying for days. ``"quarantine"`` holds it; ``"none"`` leaves it to
the policy's scores and rules (each symbol's default score is 10).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway import mime
from gateway.filterapi import Action, Filter, FilterContext, Result, Symbol, Verdict
from gateway.replies import Reply
from gateway.services import Services
from gateway.settings import action_setting, check_keys, symbol_list

SYMBOLS = {"MIME_TOO_DEEP": 10.0, "MIME_TOO_MANY_PARTS": 10.0, "MIME_TOO_MANY_HEADERS": 10.0,
           "MIME_TOO_MANY_ENCODED_WORDS": 10.0, "MIME_AMBIGUOUS": 10.0}
WHAT = {"MIME_TOO_DEEP": "MIME nesting", "MIME_TOO_MANY_PARTS": "MIME parts",
        "MIME_TOO_MANY_HEADERS": "header fields", "MIME_TOO_MANY_ENCODED_WORDS": "encoded words",
        "MIME_AMBIGUOUS": "MIME structure read two ways:"}


class MimeFilter(Filter):
    name = "mime"
    local = True  # no DNS, no sockets: runs in its stage's coroutine

    def __init__(self, action: Action | None, action_on: frozenset[str]) -> None:
        self.action = action
        self.action_on = action_on

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> MimeFilter:
        check_keys(cfg, {"action", "action_on"})
        return cls(action_setting(cfg), symbol_list(cfg, "action_on", SYMBOLS, SYMBOLS))

    async def on_message(self, ctx: FilterContext) -> Result:
        assert ctx.message is not None
        view = await mime.view(ctx.message)
        return self.result(view.limits)

    def result(self, found: tuple[tuple[str, str], ...]) -> Result:
        symbols = tuple(Symbol(name, (detail,), SYMBOLS[name]) for name, detail in found)
        verdict = None
        hit = next(((n, d) for n, d in found if n in self.action_on), None)
        if hit is not None and self.action is not None:
            name, detail = hit
            reply = Reply(554, "5.6.0", f"Message structure refused: {WHAT[name]} {detail} "
                                        f"({name})")
            verdict = Verdict(self.action, reply if self.action is Action.REJECT else None,
                              f"{name} {detail}")
        return Result(symbols=symbols, verdict=verdict)
