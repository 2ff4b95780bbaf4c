"""Pass counts of the public conformance suites (SPF, DKIM, DMARC, ARC), printed together at the
end of a test run by the ``pytest_terminal_summary`` hook in tests/conftest.py."""

from __future__ import annotations

from collections import defaultdict

_counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # suite -> [passed, total]
_notes: dict[str, str] = {}
_reports: dict[str, str] = {}


def record(suite: str, passed: bool) -> None:
    c = _counts[suite]
    c[1] += 1
    c[0] += int(passed)


def note(suite: str, text: str) -> None:
    """A remark shown after the count (e.g. cases that deliberately differ)."""
    _notes[suite] = text


def report(name: str, text: str) -> None:
    """A measured figure shown as is (e.g. the spam accuracy)."""
    _reports[name] = text


def lines() -> list[str]:
    out = [f"{name}: {text}" for name, text in sorted(_reports.items())]
    for suite in sorted(_counts):
        passed, total = _counts[suite]
        extra = f"  ({_notes[suite]})" if suite in _notes else ""
        out.append(f"{suite}: {passed}/{total} passed{extra}")
    return out
