"""Property-based tests (hypothesis) for every parser a trust decision rests on: each agrees
with its reference library, or refuses; none crashes.

Runs are derandomized (a fixed seed per test) so the test command is deterministic; set
``MAILGATE_HYPOTHESIS_RANDOM=1`` to explore with fresh random examples, and
``MAILGATE_HYPOTHESIS_SCALE=10`` for ten times as many examples."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("MAILGATE_HYPOTHESIS_SCALE") or 1)


def examples(n: int) -> int:
    """``n`` examples, times MAILGATE_HYPOTHESIS_SCALE."""
    return max(1, int(n * SCALE))


PROPS = settings(max_examples=examples(200), deadline=None, database=None,
                 derandomize=not os.environ.get("MAILGATE_HYPOTHESIS_RANDOM"),
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])
