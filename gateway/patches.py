"""Where mailgate replaces a private part of a library (for speed or memory), the replacement
proves itself before it is used: the registry of those patches, their checks and their status.

Each patch module calls :func:`install` once, when it is imported (before any message is
handled), with a *check* (known answers compared with the library's own, the private symbols
it relies on looked up; it returns None when all hold, else the reason) and an *apply* that
puts the patch in place. When the check fails or raises, nothing is applied: the library's own
path stays in use, and one warning line names the patch and the reason; the gateway runs on.
docs/architecture.md ("Patched library internals") lists the patches, their checks and the
version bounds in pyproject.toml that go with them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("mailgate.patches")

ACTIVE = "active"


@dataclass(frozen=True)
class PatchStatus:
    name: str  # "<library>.<what>", e.g. "dkimpy.rsa-powmod"
    active: bool
    reason: str  # why the library's own path is used ("" when active)


_status: dict[str, PatchStatus] = {}


def install(name: str, check: Callable[[], str | None],
            apply: Callable[[], None] | None = None) -> bool:
    """Run ``check`` and, when it passes, ``apply``; True when the patch is in use. Once per
    process and name: later calls answer the first one's outcome (see :func:`forget`)."""
    done = _status.get(name)
    if done is not None:
        return done.active
    try:
        reason = check()
    except Exception as e:  # a changed library may fail the check in any way
        reason = f"check raised {type(e).__name__}: {e}"
    if reason is None and apply is not None:
        try:
            apply()
        except Exception as e:
            reason = f"applying it raised {type(e).__name__}: {e}"
    _status[name] = PatchStatus(name, reason is None, reason or "")
    if reason is not None:
        log.warning("patch %s disabled, the library's own path is used: %s", name, reason)
    return reason is None


def active(name: str) -> bool:
    """Whether patch ``name`` was installed and is in use."""
    st = _status.get(name)
    return st is not None and st.active


def statuses() -> list[PatchStatus]:
    """Every patch installed so far in this process, in installation order."""
    return list(_status.values())


def forget(name: str) -> None:
    """Let ``install`` run ``name``'s check again (tests)."""
    _status.pop(name, None)


def calls(fn: object, name: str) -> bool:
    """Whether the code of function ``fn`` names global or attribute ``name`` (a library's
    function still reaching the hook a patch replaces)."""
    code = getattr(fn, "__code__", None)
    return code is not None and name in code.co_names
