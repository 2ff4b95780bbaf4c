"""A private, throw-away SpamAssassin ``spamd`` for tests (recipe: shared/corpora/SERVICES.md §2).

``SpamdInstance()`` starts ``spamd`` in the foreground as a child of the test process, on
``127.0.0.1:<free port>`` and on a unix socket in its own temp dir, offline (``--local``: no DNS
blocklists, Razor, Pyzor or DCC) with the rules shipped in the package, no user config. It runs
as ``debian-spamd`` (the Debian package's user); its temp dir is made by ``mkdtemp`` under /tmp
and opened to that user (pytest's 0700 temp dirs are not). Readiness = a ``PING`` answered with
``PONG`` (about 1 s). ``stop()`` sends SIGTERM to the parent by its PID; the children exit with it.

Usage::

    with SpamdInstance() as sa:
        ...  # sa.address == "127.0.0.1:<port>", sa.socket_address == "unix:/tmp/.../spamd.sock"

``spamd_unavailable_reason()`` says why it cannot run here (for skip markers).
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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


class SpamdInstance:
    def __init__(self, max_children: int = 2) -> None:
        self.max_children = max_children
        self.port = 0
        self.workdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: object = None

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
        self.workdir = Path(tempfile.mkdtemp(prefix="mailgate-spamd-"))
        self.workdir.chmod(0o755)
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
                f"--max-children={self.max_children}", "--min-children=1"]
        out = (self.workdir / "stdout.log").open("ab")
        self._out = out
        self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                          "LANG": "C.UTF-8"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"spamd exited with {self.proc.returncode}:\n{log}")
            if ping((HOST, self.port)) and ping(str(self.socket_path)):
                return self
            time.sleep(0.1)
        log = self.log_tail()
        self.stop()
        raise RuntimeError(f"spamd not ready after {timeout_s}s:\n{log}")

    def log_tail(self, n: int = 30) -> str:
        if self.workdir is None:
            return ""
        lines: list[str] = []
        for name in ("stdout.log", "spamd.log"):
            p = self.workdir / name
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(lines)

    def stop(self, timeout_s: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not None:
            self._out.close()  # type: ignore[attr-defined]
            self._out = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> SpamdInstance:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_shared: SpamdInstance | None = None


def shared() -> SpamdInstance:
    """One instance for the whole test session (every test module that needs it shares it),
    started on first use and stopped when the test process exits."""
    global _shared
    if _shared is None:
        inst = SpamdInstance().start()
        atexit.register(inst.stop)
        _shared = inst
    return _shared
