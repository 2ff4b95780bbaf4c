"""What the library-patch tests share: the registry's status kept across a test that
re-installs patches under injected faults, and the warning lines gateway/patches.py logs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest

from gateway import patches


@contextlib.contextmanager
def kept_patch_status() -> Iterator[None]:
    """The registry's status after the block as it was before it."""
    status = dict(patches._status)
    try:
        yield
    finally:
        patches._status.clear()
        patches._status.update(status)


def patch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warning lines logged by the patch registry."""
    return [r.getMessage() for r in caplog.records
            if r.name == "mailgate.patches" and r.levelno == logging.WARNING]
