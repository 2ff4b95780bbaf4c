"""Shared pytest fixtures: a factory for real gateway processes on loopback, and a directory
every user may use (for runs as nobody)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    """``gateway_factory(policy_dict_or_toml, **kw)`` starts a gateway in its own work dir and
    stops it at the end of the test."""
    started: list[GatewayProcess] = []

    def make(policy: dict[str, Any] | str, *, start: bool = True, **kw: Any) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(started)}", policy, **kw)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may read and write (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="mailgate-public-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The conformance suites' pass counts (SPF, DKIM, DMARC, ARC) and the spam accuracy, one
    line each."""
    from tests.support import tally

    found = tally.lines()
    if found:
        terminalreporter.section("conformance suites and measured accuracy")
        for line in found:
            terminalreporter.write_line(line)
