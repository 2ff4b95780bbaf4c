"""What a running gateway imports: heavy libraries that only some policies use are loaded only
when the policy uses them (dnspython ~6 MB, sqlite3 ~1.3 MB per process; the peak-RSS target in
bench/ counts every MB). Checked in a fresh interpreter that builds the gateway's Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import base_policy
from tests.support.toml import dumps

PROBE = """
import json, sys
from pathlib import Path
from gateway.app import Runtime
Runtime(Path(sys.argv[1]))
print(json.dumps(sorted(m for m in sys.modules if "." not in m)))
"""


def loaded_after_start(tmp_path: Path, **sections: Any) -> set[str]:
    policy = base_policy("smtp://127.0.0.1:2525", spool={"directory": str(tmp_path / "spool")},
                         **sections)
    path = tmp_path / "policy.toml"
    path.write_text(dumps(policy))
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("module", ["dns", "sqlite3", "secrets"])
def test_a_relay_without_dns_filters_loads_no_dnspython_and_no_sqlite(tmp_path: Path,
                                                                       module: str) -> None:
    assert module not in loaded_after_start(tmp_path)


def test_a_policy_with_a_dns_filter_loads_dnspython(tmp_path: Path) -> None:
    """The control: the probe does see dnspython when a filter needs it."""
    filters = [{"name": "rcpt", "recipients": ["@example.test"]}, {"name": "spf"}]
    assert "dns" in loaded_after_start(tmp_path, filters=filters)
