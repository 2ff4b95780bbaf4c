"""A private, throw-away Rspamd for tests (recipe: shared/corpora/SERVICES.md §3).

``RspamdInstance()`` runs ``rspamd -f`` (foreground) as a child of the test process with the
stock ``/etc/rspamd/rspamd.conf`` plus a private ``LOCAL_CONFDIR`` overlay:

* ``override.d/worker-normal.inc`` / ``worker-controller.inc``: the normal worker (the
  ``/checkv2`` HTTP API) and the controller bind ``127.0.0.1:<free port>`` (override.d has a
  higher priority than the stock ``bind_socket``, so it replaces it instead of adding to it);
  the proxy worker is disabled;
* ``local.d/options.inc``: DNS only to an in-process test DNS server (tests/support/dnsserver.py,
  empty zone: every name is NXDOMAIN at once — nothing leaves the machine, and no scan waits
  for a DNS timeout, as it would with a dead nameserver: ~3 s per message);
* the modules that only talk to the internet are disabled (fuzzy_check, rbl, phishing,
  rspamd_update, whitelist, url_redirector).

It runs as ``_rspamd``. RUNDIR and LOGDIR live in a ``mkdtemp`` dir under /tmp; DBDIR — where
hs_helper keeps the compiled Hyperscan cache (a cold start compiles it, ~17 s; warm ~1 s) — is
a cache dir shared by runs: ``$MAILGATE_TEST_CACHE/rspamd-db`` (default
``/tmp/mailgate-test-cache``). Readiness = ``GET /ping`` answers ``pong``. ``stop()`` sends
SIGTERM to the main process by its PID (its workers exit with it). A reaper ends it should the
test process die without ``stop()`` (tests/support/daemon.py).

``rspamd_unavailable_reason()`` says why it cannot run here (for skip markers).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
from pathlib import Path

from tests.support.daemon import HOST, PrivateDaemon, free_port, once, private_dir
from tests.support.dnsserver import DnsServer

__all__ = ["HOST", "USER", "RspamdInstance", "cache_dir", "free_port", "ping",
           "rspamd_unavailable_reason", "shared"]

USER = "_rspamd"
CONF = Path("/etc/rspamd/rspamd.conf")
OFFLINE_MODULES = ("fuzzy_check", "rbl", "phishing", "rspamd_update", "whitelist",
                   "url_redirector")


def cache_dir() -> Path:
    return Path(os.environ.get("MAILGATE_TEST_CACHE", "/tmp/mailgate-test-cache"))


def rspamd_unavailable_reason() -> str | None:
    if shutil.which("rspamd") is None or not CONF.exists():
        return "rspamd is not installed (Debian package rspamd)"
    if os.geteuid() != 0:
        return "rspamd needs root here (it drops to the _rspamd user)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"user {USER} does not exist"
    return None


def ping(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        return reply.startswith(b"HTTP/1.1 200") and b"pong" in reply
    except OSError:
        return False


class RspamdInstance(PrivateDaemon):
    name = "rspamd"
    log_names = ("stdout.log", "rspamd/log/rspamd.log")

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.controller_port = 0
        self.dns: DnsServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _write_config(self, root: Path, db: Path) -> list[str]:
        local, override = root / "local.d", root / "override.d"
        for d in (local, override, root / "run", root / "log"):
            d.mkdir(parents=True)
        (override / "worker-normal.inc").write_text(
            f'bind_socket = "{HOST}:{self.port}";\ncount = 1;\n')
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "{HOST}:{self.controller_port}";\n')
        (local / "worker-proxy.inc").write_text("enabled = false;\n")
        assert self.dns is not None
        (local / "options.inc").write_text(
            f'dns {{\n  nameserver = ["{HOST}:{self.dns.port}"];\n  timeout = 1s;\n'
            "  retransmits = 1;\n}\n")
        (local / "logging.inc").write_text(
            f'type = "file";\nfilename = "{root}/log/rspamd.log";\nlevel = "info";\n')
        for m in OFFLINE_MODULES:
            (local / f"{m}.conf").write_text("enabled = false;\n")
        uid, gid = pwd.getpwnam(USER).pw_uid, grp.getgrnam(USER).gr_gid
        for p in [root, *root.rglob("*"), db]:
            os.chown(p, uid, gid)
        return [f"--var=LOCAL_CONFDIR={root}", f"--var=DBDIR={db}",
                f"--var=RUNDIR={root / 'run'}", f"--var=LOGDIR={root / 'log'}"]

    def start(self, timeout_s: float = 120) -> RspamdInstance:
        reason = rspamd_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.workdir = private_dir("mailgate-rspamd-")
        db = cache_dir() / "rspamd-db"
        db.mkdir(parents=True, exist_ok=True)
        self.dns = DnsServer("").start()
        self.port, self.controller_port = free_port(), free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        root = self.workdir / "rspamd"
        variables = self._write_config(root, db)
        argv = ["rspamd", "-f", "-u", USER, "-g", USER, "-c", str(CONF),
                "-p", str(root / "run" / "rspamd.pid"), *variables]
        self._launch(argv, lambda: ping(self.port), timeout_s, 0.2)
        return self

    def _cleanup(self) -> None:
        if self.dns is not None:
            self.dns.stop()
            self.dns = None


shared = once(lambda: RspamdInstance().start())
shared.__doc__ = """The one RspamdInstance of the test session (tests/support/daemon.py: once)."""
