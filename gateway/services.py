"""Shared services injected into filters by ``from_config``: clock, hostname, the DNS resolver
(configured from the policy's ``[dns]``), and (with later work) state stores. Filters never
create these themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.dnsresolver import DnsResolver


@dataclass(frozen=True)
class Services:
    hostname: str = "mailgate.localdomain"
    clock: Callable[[], float] = field(default=time.time)
    resolver: DnsResolver | None = None  # None only in unit tests that need no DNS
    # the policy file's directory: filters resolve relative paths of their own files (rule
    # files, maps, keys, stores) against it, with ``path``; None = the working directory
    policy_dir: Path | None = None
    # where a filter's state left at its default goes (the Bayes store); None = the working
    # directory (gateway/policy/locate.py state_dir)
    state_dir: Path | None = None

    def path(self, value: str | Path) -> Path:
        """A path from a filter's settings: relative ones are relative to the policy file's
        directory (docs/policy.md), as every path in a policy."""
        p = Path(value)
        return p if p.is_absolute() or self.policy_dir is None else self.policy_dir / p
