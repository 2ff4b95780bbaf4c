"""Typed readers for a filter's own settings: each raises ConfigError naming the key, so the
policy loader can report ``file: filters.NAME.KEY: reason``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.filterapi import Action, ConfigError

# The keys of a ``[[filters]]`` entry the loader reads itself (gateway/policy/loader.py
# FILTER_KEYS); everything else in the entry is the filter's own settings.
ENTRY_KEYS = frozenset({"name", "module", "timeout_s", "on_error", "enabled"})
# what a content filter's ``action`` setting may name (attachments, clamav, mime)
ACTIONS = {"reject": Action.REJECT, "quarantine": Action.QUARANTINE, "none": None}


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'workers'?)`` for an unknown key close to a known one, else ``""``."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(cfg: Mapping[str, Any], allowed: set[str]) -> None:
    """ConfigError naming every unknown key of ``cfg`` (the first as its key, all in
    ``every``), so one check of a policy reports them all."""
    known = ", ".join(sorted(allowed))
    found = tuple((key, f"unknown setting{did_you_mean(key, allowed | ENTRY_KEYS)} "
                        f"(known: {known})") for key in cfg if key not in allowed)
    if found:
        raise ConfigError(*found[0], more=found[1:])


def str_list(cfg: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = cfg.get(key, [])
    if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(key, "must be a list of strings")
    return tuple(v)


def opt_str(cfg: Mapping[str, Any], key: str) -> str | None:
    v = cfg.get(key)
    if v is not None and (not isinstance(v, str) or not v):
        raise ConfigError(key, "must be a non-empty string")
    return v


def boolean(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(key, "must be true or false")
    return v


def positive(cfg: Mapping[str, Any], key: str, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ConfigError(key, "must be a number > 0")
    return float(v)


def integer(cfg: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}")
    return v


def action_setting(cfg: Mapping[str, Any], key: str = "action", default: str = "reject"
           ) -> Action | None:
    """The verdict a content filter gives on a finding: ``reject``, ``quarantine`` or
    ``none`` (no verdict, symbols only)."""
    name = opt_str(cfg, key) or default
    if name not in ACTIONS:
        raise ConfigError(key, f"must be one of {', '.join(ACTIONS)}")
    return ACTIONS[name]


def symbol_list(cfg: Mapping[str, Any], key: str, known: Iterable[str],
                default: Iterable[str]) -> frozenset[str]:
    """A list of the filter's own symbol names (``action_on``); the default when absent."""
    names = str_list(cfg, key) if key in cfg else tuple(default)
    known = set(known)
    for s in names:
        if s not in known:
            raise ConfigError(key, f"{s!r} is not a symbol of this filter "
                                   f"(known: {', '.join(sorted(known))})")
    return frozenset(names)
