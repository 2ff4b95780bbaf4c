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
# the container test: a private network namespace with loopback up (unshare, ip), a non-root
# run (setpriv); systemd-analyze checks the example unit
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v unshare >/dev/null 2>&1 && command -v setpriv >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || need_pkgs+=(systemd)
# content filtering: a real clamd, spamd and rspamd, started (offline, on loopback) by the tests
command -v clamd >/dev/null 2>&1 || need_pkgs+=(clamav-daemon clamav clamdscan)
command -v spamd >/dev/null 2>&1 || need_pkgs+=(spamassassin spamd spamc sa-compile)
command -v rspamd >/dev/null 2>&1 || need_pkgs+=(rspamd)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -c "import ensurepip, venv" 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "test.sh: missing Debian packages (${need_pkgs[*]}); run as root or install them" >&2
        exit 1
    fi
    echo "test.sh: installing ${need_pkgs[*]}"
    apt-get update -q
    # Postfix must not become this machine's MTA: "No configuration". No package may start a
    # daemon (clamd, spamd, rspamd, postfix): a policy-rc.d refuses every start while we
    # install (ours is removed afterwards; an existing one is left alone).
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    own_policy_rc=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        own_policy_rc=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT   # also if the install fails
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
    if [ -n "$own_policy_rc" ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    # spamassassin's postinst leaves a gpg-agent for its update keys running: stop that one
    if [ -d /var/lib/spamassassin/sa-update-keys ] && command -v gpgconf >/dev/null 2>&1; then
        gpgconf --homedir /var/lib/spamassassin/sa-update-keys --kill gpg-agent 2>/dev/null || true
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# The project's claims about itself: lint and types are clean (a finding fails the run).
echo "test.sh: ruff check"
.venv/bin/ruff check .
echo "test.sh: mypy gateway filters"
.venv/bin/mypy gateway filters

exec .venv/bin/python -m pytest "$@"
