"""Shared services injected into filters by ``from_config``: clock, hostname, and (with later
work) the DNS resolver and state stores. Filters never create these themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Services:
    hostname: str = "mailgate.localdomain"
    clock: Callable[[], float] = field(default=time.time)
