"""A private, throw-away SpamAssassin ``spamd`` for tests (recipe: shared/corpora/SERVICES.md §2).

``SpamdInstance()`` starts ``spamd`` in the foreground as a child of the test process, on
``127.0.0.1:<free port>`` and on a unix socket in its own temp dir, offline (``--local``: no DNS
blocklists, Razor, Pyzor or DCC) with the rules shipped in the package, no user config. It runs
as ``debian-spamd`` (the Debian package's user); its temp dir is made by ``mkdtemp`` under /tmp
and opened to that user (pytest's 0700 temp dirs are not). Readiness = a ``PING`` answered with
``PONG`` (about 1 s). ``stop()`` sends SIGTERM to the parent by its PID; the children exit with it.
A reaper ends it should the test process die without ``stop()`` (tests/support/daemon.py).

Usage::

    with SpamdInstance() as sa:
        ...  # sa.address == "127.0.0.1:<port>", sa.socket_address == "unix:/tmp/.../spamd.sock"

``spamd_unavailable_reason()`` says why it cannot run here (for skip markers).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
from pathlib import Path

from tests.support.daemon import HOST, PrivateDaemon, free_port, once, private_dir

__all__ = ["HOST", "USER", "SpamdInstance", "free_port", "ping", "shared",
           "spamd_unavailable_reason"]

USER = "debian-spamd"


def spamd_unavailable_reason() -> str | None:
    if shutil.which("spamd", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        return "spamd is not installed (Debian package spamd)"
    if os.geteuid() != 0:
        return "spamd needs root here (it drops to the debian-spamd user)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"user {USER} does not exist"
    return None


def ping(address: tuple[str, int] | str, timeout_s: float = 1.0) -> bool:
    """True when a SPAMC ``PING`` at ``address`` (host/port, or a unix socket path) is
    answered with ``PONG``."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(address)
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        return b"PONG" in reply
    except OSError:
        return False


class SpamdInstance(PrivateDaemon):
    name = "spamd"
    log_names = ("stdout.log", "spamd.log")

    def __init__(self, max_children: int = 2) -> None:
        super().__init__()
        self.max_children = max_children
        self.port = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def socket_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "spamd.sock"

    @property
    def socket_address(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self, timeout_s: float = 30) -> SpamdInstance:
        reason = spamd_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.workdir = private_dir("mailgate-spamd-")
        home = self.workdir / "home"
        home.mkdir()
        pw = pwd.getpwnam(USER)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        self.port = free_port()
        argv = ["spamd", f"--listen={HOST}:{self.port}", f"--listen={self.socket_path}",
                f"--allowed-ips={HOST}", "--local", "--nouser-config",
                f"--username={USER}", f"--groupname={USER}", f"--helper-home-dir={home}",
                f"--pidfile={self.workdir / 'spamd.pid'}",
                f"--syslog={self.workdir / 'spamd.log'}",
                f"--max-children={self.max_children}", "--min-children=1",
                # Bayes in the temp dir, not the system user's store in /var/lib/spamassassin
                # (--helper-home-dir does not move it): nothing learnt outlives the instance
                f"--cf=bayes_path {home / 'bayes'}"]
        self._launch(argv, lambda: ping((HOST, self.port)) and ping(str(self.socket_path)),
                     timeout_s, 0.1, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                          "LANG": "C.UTF-8"})
        return self


shared = once(lambda: SpamdInstance().start())
shared.__doc__ = """The one SpamdInstance of the test session (tests/support/daemon.py: once)."""
