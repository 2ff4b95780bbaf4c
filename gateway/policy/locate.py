"""Which policy file a ``mailgate`` command uses, the same for every subcommand: ``--policy``,
else ``$MAILGATE_POLICY``, else ``/etc/mailgate/mailgate.toml``, else ``./policies/default.toml``
(the first two are taken as given, even when the file is missing: the loader then says so; the
last two only when they exist). ``$MAILGATE_SYSTEM_POLICY`` replaces the ``/etc`` location (for
tests and packagers).

And where the state a policy leaves at its defaults goes (the spool, the Maildir, the Bayes
store): :func:`state_dir`."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import PolicyError

ENV_POLICY = "MAILGATE_POLICY"
ENV_STATE_DIR = "MAILGATE_STATE_DIR"
SYSTEM_STATE_DIR = Path("/var/lib/mailgate")
ENV_SYSTEM_POLICY = "MAILGATE_SYSTEM_POLICY"
SYSTEM_POLICY = Path("/etc/mailgate/mailgate.toml")
LOCAL_POLICY = Path("policies/default.toml")


def system_policy() -> Path:
    return Path(os.environ.get(ENV_SYSTEM_POLICY) or SYSTEM_POLICY)


def find_policy(given: Path | str | None) -> Path:
    """The policy file to load; PolicyError (one line listing the places looked at) if no
    option or variable names one and neither default location holds one."""
    if given is not None and str(given):
        return Path(given)
    env = os.environ.get(ENV_POLICY)
    if env:
        return Path(env)
    for candidate in (system_policy(), LOCAL_POLICY):
        if candidate.is_file():
            return candidate
    raise PolicyError([
        f"no policy file: looked at --policy (not given), ${ENV_POLICY} (not set), "
        f"{system_policy()} and ./{LOCAL_POLICY} (in {Path.cwd()}): neither exists"])


def state_dir(policy_path: Path | str) -> Path | None:
    """The directory for the state a policy does not place itself: ``$MAILGATE_STATE_DIR``;
    else ``/var/lib/mailgate`` for the system policy (``/etc/mailgate/mailgate.toml``), so the
    gateway and every command run from anywhere share one spool, as a packaged MTA does; else
    None, the working directory (``scripts/run.sh``'s ``./Maildir``)."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(os.path.abspath(env))
    try:
        if Path(policy_path).resolve() == system_policy().resolve():
            return SYSTEM_STATE_DIR
    except OSError:
        pass
    return None
