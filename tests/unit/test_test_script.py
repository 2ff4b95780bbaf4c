"""The README's test command (scripts/test.sh) runs ruff and mypy and fails on a finding,
before any test runs: a lint or type error cannot land behind a green pytest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def _fake_checkout(tmp_path: Path, *, ruff_rc: int, mypy_rc: int) -> tuple[Path, Path]:
    """A copy of scripts/test.sh beside a .venv whose tools are stubs that log their calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    _stub(bin_dir / "python", f'echo "python $*" >> {log}')
    _stub(bin_dir / "ruff", f'echo "ruff $*" >> {log}; exit {ruff_rc}')
    _stub(bin_dir / "mypy", f'echo "mypy $*" >> {log}; exit {mypy_rc}')
    return tmp_path, log


def _needs_no_install() -> None:
    for tool in ("swaks", "openssl", "clamd", "spamd", "rspamd", "ip", "unshare", "setpriv",
                 "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: test.sh would try to install packages")
    if not Path("/usr/sbin/postfix").exists():
        pytest.skip("postfix missing: test.sh would try to install packages")


@pytest.mark.parametrize(("ruff_rc", "mypy_rc", "expect_rc", "pytest_runs"), [
    (0, 0, 0, True), (1, 0, 1, False), (0, 1, 1, False)])
def test_lint_and_types_gate_the_suite(tmp_path: Path, ruff_rc: int, mypy_rc: int,
                                       expect_rc: int, pytest_runs: bool) -> None:
    _needs_no_install()
    root, log = _fake_checkout(tmp_path, ruff_rc=ruff_rc, mypy_rc=mypy_rc)
    proc = subprocess.run(["bash", str(root / "scripts" / "test.sh"), "-k", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == expect_rc, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("python -m pip install")
    assert "ruff check ." in calls
    assert any(c.startswith("python -m pytest") for c in calls) is pytest_runs
    if ruff_rc == 0:
        assert "mypy gateway filters" in calls
