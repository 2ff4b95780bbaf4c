"""Where the state a policy leaves at its defaults goes (gateway/policy/locate.py state_dir):
$MAILGATE_STATE_DIR, else /var/lib/mailgate for the system policy, else the working directory;
and the loader places the spool, the Maildir and the Bayes store there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from filters.bayes import parse_settings
from gateway.policy.loader import load_policy
from gateway.policy.locate import ENV_STATE_DIR, ENV_SYSTEM_POLICY, state_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def system_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    etc = tmp_path / "etc" / "mailgate"
    etc.mkdir(parents=True)
    path = etc / "mailgate.toml"
    shutil.copy(REPO / "policies" / "default.toml", path)
    monkeypatch.setenv(ENV_SYSTEM_POLICY, str(path))
    monkeypatch.delenv(ENV_STATE_DIR, raising=False)
    return path


def test_the_system_policy_keeps_its_state_in_var_lib(system_copy: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(system_copy.parent.parent)  # wherever it runs
    assert state_dir(system_copy) == Path("/var/lib/mailgate")
    assert state_dir("mailgate/mailgate.toml") == Path("/var/lib/mailgate")  # same file
    p = load_policy(system_copy)
    assert p.spool.directory == Path("/var/lib/mailgate/spool")
    assert str(p.relay.downstream) == "maildir:/var/lib/mailgate/Maildir"
    assert parse_settings({}, state_dir=p.state_dir).db_path == Path("/var/lib/mailgate/bayes.db")


def test_another_policy_keeps_it_in_the_working_directory(system_copy: Path) -> None:
    other = REPO / "policies" / "default.toml"
    assert state_dir(other) is None
    p = load_policy(other)
    assert p.spool.directory == Path("spool")
    assert str(p.relay.downstream) == "maildir:Maildir"
    assert parse_settings({}, state_dir=p.state_dir).db_path == Path("bayes.db")


def test_the_variable_wins_and_written_paths_stay_relative_to_the_policy(
        system_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_STATE_DIR, str(tmp_path / "state"))
    assert state_dir(system_copy) == tmp_path / "state"
    written = tmp_path / "p.toml"
    written.write_text('[spool]\ndirectory = "q"\n[relay]\ndownstream = "maildir:box"\n')
    p = load_policy(written)
    assert p.spool.directory == tmp_path / "q"  # written: beside the policy file
    assert str(p.relay.downstream) == f"maildir:{tmp_path / 'box'}"
