#!/usr/bin/env bash
# Install mailgate into ./.venv (first run only) and start it on the shipped default policy:
# SMTP on 127.0.0.1:2525, mail for example.test delivered into ./Maildir (the repository root:
# the default policy leaves its state at the defaults, relative to where mailgate runs).
# Usage: bash scripts/run.sh [mailgate run options, e.g. --policy FILE --log-format json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/mailgate ]; then
    if ! "$PY" -c "import ensurepip, venv" 2>/dev/null; then
        echo "run.sh: $PY cannot make a virtualenv; install it first: apt-get install python3-venv" >&2
        exit 1
    fi
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
# the shipped policy even where /etc/mailgate/mailgate.toml exists (a --policy given wins: last)
exec .venv/bin/mailgate run --policy policies/default.toml "$@"
