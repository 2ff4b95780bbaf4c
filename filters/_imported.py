"""What the ``spamd`` and ``rspamd`` filters share: both import a scanning daemon's result as
symbols carrying the daemon's own scores (used only where the policy's ``[scores]`` has no entry).

* :func:`scorer_settings`: their common settings (``scan_timeout_s``, ``max_bytes``, ``prefix``,
  ``score_factor``);
* :func:`skipped`: the ``<PREFIX>SKIPPED`` result for a message larger than ``max_bytes``;
* :func:`imported_symbols`: the daemon's rules/symbols as ``<PREFIX><NAME>`` with score ×
  ``score_factor``, then ``<PREFIX>SCORE`` carrying the part of the daemon's total they do not
  account for — so the imported scores always add up to total × ``score_factor``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.filterapi import ConfigError, Result, Symbol
from gateway.message import Message
from gateway.settings import integer, opt_str, positive

_NOT_NAME = re.compile(r"[^A-Z0-9_]")
_PREFIX = re.compile(r"^[A-Z][A-Z0-9_]*$")


def symbol_name(prefix: str, name: str) -> str:
    """``prefix`` + the backend's name, upper-cased, anything outside A-Z0-9_ made ``_``."""
    return prefix + _NOT_NAME.sub("_", name.upper())


def imported(score: float, factor: float) -> float:
    return round(score * factor, 3) + 0.0  # + 0.0: no "-0" in the log


def scorer_settings(cfg: Mapping[str, Any], default_prefix: str, default_max: int
                    ) -> tuple[float, int, str, float]:
    """The settings the spamd and rspamd filters share: scan_timeout_s, max_bytes, prefix,
    score_factor."""
    timeout = positive(cfg, "scan_timeout_s", 8.0)
    max_bytes = integer(cfg, "max_bytes", default_max, 1)
    prefix = opt_str(cfg, "prefix") or default_prefix
    if not _PREFIX.match(prefix):
        raise ConfigError("prefix", "must be upper-case letters, digits and _ (e.g. SA_)")
    factor = cfg.get("score_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
        raise ConfigError("score_factor", "must be a number >= 0")
    return timeout, max_bytes, prefix, float(factor)


def skipped(msg: Message, max_bytes: int, prefix: str) -> Result | None:
    """``<prefix>SKIPPED`` (option ``size N > max_bytes``) for a message too large to send;
    None when it may be sent."""
    if msg.size <= max_bytes:
        return None
    why = f"size {msg.size} > {max_bytes}"
    return Result(symbols=(Symbol(f"{prefix}SKIPPED", (why,)),), data={"skipped": why})


def imported_symbols(prefix: str, factor: float,
                     hits: Iterable[tuple[str, float, tuple[str, ...]]],
                     total: float, summary: str, reserved: Iterable[str] = ()) -> list[Symbol]:
    """``<prefix><NAME>`` for each of the daemon's ``hits`` (name, score, options) with
    ``imported(score, factor)``, then ``<prefix>SCORE`` (option ``summary``) with the part of
    ``total`` the hits do not account for. The first hit of a name wins; a hit whose name is
    one of the filter's own symbols is left out: ``SCORE``, ``SKIPPED`` and ``reserved`` (names
    after the prefix; one ending in ``_`` reserves every name it starts)."""
    mine = {"SCORE", "SKIPPED", *reserved}
    taken = {prefix + r for r in mine if not r.endswith("_")}
    families = tuple(prefix + r for r in mine if r.endswith("_"))
    symbols: list[Symbol] = []
    scores: dict[str, float] = {}
    for name, score, options in hits:
        sym = symbol_name(prefix, name)
        if sym in scores or sym in taken or sym.startswith(families):
            continue
        scores[sym] = score
        symbols.append(Symbol(sym, options, imported(score, factor)))
    rest = total - sum(scores.values())
    symbols.append(Symbol(f"{prefix}SCORE", (summary,), imported(rest, factor)))
    return symbols
