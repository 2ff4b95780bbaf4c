#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (Debian packages when
# missing, a virtualenv with the Python deps), then runs pytest. Every service the tests use
# (the gateway, SMTP sinks, Postfix) is started and stopped by the tests themselves.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v swaks >/dev/null 2>&1 || need_pkgs+=(swaks)
[ -x /usr/sbin/postfix ] || need_pkgs+=(postfix)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)   # test certificates for STARTTLS
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -c "import ensurepip, venv" 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh: missing Debian packages (${need_pkgs[*]}); run as root or install them" >&2
        exit 1
    fi
    echo "test.sh: installing ${need_pkgs[*]}"
    apt-get update -q
    # Postfix must not become this machine's MTA: "No configuration", and no daemon is started.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

exec .venv/bin/python -m pytest "$@"
