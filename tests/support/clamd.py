"""A real ClamAV clamd for tests, offline: the two-signature database of
``../shared/corpora/services/clamav`` (EICAR + the clamav-testfiles ``clam.exe``), a private
temp dir, a free TCP port on 127.0.0.1 *and* a unix socket; ready once it answers PONG;
stopped by its PID (and by a reaper should the test process die: tests/support/daemon.py).

``with ClamdServer(workdir) as clamd:`` for one of your own (e.g. with a small
``stream_max_length``), or :func:`shared` for the one clamd a whole test
session shares (reference counted: it stops when its last user is done). ``SKIP_REASON`` is
None when clamd and the database are there, otherwise why the tests must skip.

Also :class:`HangingServer`: a TCP listener that accepts and never answers (a hung clamd);
``EICAR`` (the test file's bytes) and :func:`mail_with_attachments` for the messages to scan.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType

from tests.support.daemon import Daemon, free_port, log_tail

__all__ = ["CORPORA", "EICAR", "EICAR_NAME", "SKIP_REASON", "TESTFILE_NAME", "ClamdServer",
           "HangingServer", "acquire", "free_port", "mail_with_attachments", "release",
           "shared"]

REPO = Path(__file__).resolve().parents[2]
CORPORA = REPO.parent / "shared" / "corpora"
DB_DIR = CORPORA / "services" / "clamav"
DB_FILES = ("local-test.ndb",)
EICAR_NAME = "Local.Test.EICAR-NDB.UNOFFICIAL"
TESTFILE_NAME = "Local.Test.ClamAV-Test-File-NDB.UNOFFICIAL"
EICAR = (CORPORA / "eicar" / "eicar.com.txt").read_bytes() if (CORPORA / "eicar").is_dir() \
    else b""


def mail_with_attachments(attachments: list[tuple[str, bytes]], *, subject: str = "files",
                          text: str = "Hello.\n",
                          message_id: str = "<clamav-test@example.org>") -> bytes:
    """A CRLF message from sender@example.org to alice@example.test: ``text``, then each
    (file name, data) as an application/octet-stream attachment (base64)."""
    m = EmailMessage()
    m["From"] = "sender@example.org"
    m["To"] = "alice@example.test"
    m["Subject"] = subject
    m["Date"] = "Sat, 28 Nov 2026 10:00:00 +0000"
    m["Message-ID"] = message_id
    m.set_content(text)
    for name, data in attachments:
        m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return re.sub(rb"\r?\n", b"\r\n", m.as_bytes())


def clamd_binary() -> str | None:
    found = shutil.which("clamd")
    if found is None and os.access("/usr/sbin/clamd", os.X_OK):  # root's PATH has /usr/sbin
        found = "/usr/sbin/clamd"
    return found


def _skip_reason() -> str | None:
    if clamd_binary() is None:
        return "clamd is not installed (Debian: apt-get install clamav-daemon; scripts/test.sh does)"
    missing = [f for f in DB_FILES if not (DB_DIR / f).is_file()]
    if missing:
        return f"ClamAV test signature database not found: {DB_DIR}/{missing[0]}"
    return None


SKIP_REASON = _skip_reason()


def _ask(address: str | tuple[str, int], command: bytes, timeout_s: float = 2.0) -> bytes:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(address)
        s.sendall(b"z" + command + b"\0")
        reply = b""
        while not reply.endswith(b"\0"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
    return reply.rstrip(b"\0")


class ClamdServer:
    """One clamd process listening on ``127.0.0.1:tcp_port`` and ``socket_path``."""

    def __init__(self, workdir: Path, *, stream_max_length: str = "25M",
                 max_threads: int = 4) -> None:
        self.workdir = workdir
        self.stream_max_length = stream_max_length
        self.max_threads = max_threads
        self.socket_path = str(workdir / "clamd.sock")
        self.tcp_port = 0
        self.daemon: Daemon | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.daemon.proc if self.daemon is not None else None

    @property
    def tcp_address(self) -> str:
        return f"tcp:127.0.0.1:{self.tcp_port}"

    @property
    def unix_address(self) -> str:
        return f"unix:{self.socket_path}"

    def _write_config(self) -> Path:
        w = self.workdir
        for sub in ("db", "tmp"):
            (w / sub).mkdir(parents=True, exist_ok=True)
        for name in DB_FILES:
            shutil.copyfile(DB_DIR / name, w / "db" / name)
        conf = w / "clamd.conf"
        conf.write_text("\n".join([
            "Foreground yes",
            f"DatabaseDirectory {w / 'db'}",
            f"LocalSocket {self.socket_path}",
            "FixStaleSocket yes",
            f"TCPSocket {self.tcp_port}",
            "TCPAddr 127.0.0.1",
            f"TemporaryDirectory {w / 'tmp'}",
            f"LogFile {w / 'clamd.log'}",
            "LogTime yes",
            f"StreamMaxLength {self.stream_max_length}",
            f"MaxThreads {self.max_threads}",
            "SelfCheck 0",
            "",
        ]))
        return conf

    def start(self, timeout_s: float = 20.0) -> ClamdServer:
        binary = clamd_binary()
        if binary is None:
            raise RuntimeError(SKIP_REASON)
        if len(self.socket_path.encode()) > 107:
            raise RuntimeError(f"unix socket path too long: {self.socket_path}")
        last = ""
        for _ in range(3):  # the free port may be taken between probing and clamd's bind
            self.tcp_port = free_port()
            conf = self._write_config()
            self.daemon = Daemon([binary, f"--config-file={conf}"],
                                 log=self.workdir / "stdout.log", cwd=self.workdir)
            if self.daemon.wait_ready(self._ready, timeout_s, 0.05) is None:
                return self
            last = self.log_tail()
            self.stop()
        raise RuntimeError(f"clamd did not become ready; log tail:\n{last}")

    def _ready(self) -> bool:
        try:
            return (_ask(("127.0.0.1", self.tcp_port), b"PING") == b"PONG"
                    and _ask(self.socket_path, b"PING") == b"PONG")
        except OSError:
            return False

    def ping(self) -> bool:
        try:
            return _ask(("127.0.0.1", self.tcp_port), b"PING") == b"PONG"
        except OSError:
            return False

    def log_tail(self, n: int = 30) -> str:
        return log_tail((self.workdir / "stdout.log", self.workdir / "clamd.log"), n)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to clamd's PID: it removes its socket and exits."""
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.stop(timeout_s)

    def __enter__(self) -> ClamdServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- the session's shared clamd --------------------------------------------------------------
_lock = threading.Lock()
_shared: ClamdServer | None = None
_users = 0
_tmp: tempfile.TemporaryDirectory[str] | None = None


def acquire() -> ClamdServer:
    """The shared clamd, started on first use (in a private temp dir)."""
    global _shared, _users, _tmp
    with _lock:
        if _shared is None:
            # short path: a unix socket path must fit in 108 bytes
            _tmp = tempfile.TemporaryDirectory(prefix="mailgate-clamd-")
            server = ClamdServer(Path(_tmp.name))
            try:
                server.start()
            except BaseException:
                _tmp.cleanup()
                _tmp = None
                raise
            _shared = server
            atexit.register(_stop_shared)  # belt and braces, should a fixture not finish
        _users += 1
        return _shared


def release() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users <= 0:
            _stop_shared_locked()


def _stop_shared() -> None:
    with _lock:
        _stop_shared_locked()


def _stop_shared_locked() -> None:
    global _shared, _users, _tmp
    if _shared is not None:
        _shared.stop()
        _shared = None
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None
    _users = 0


@contextlib.contextmanager
def shared() -> Iterator[ClamdServer]:
    """``with shared() as clamd:`` — the session's clamd (one process however many modules use
    it, while at least one does). Use from a session-scoped fixture."""
    server = acquire()
    try:
        yield server
    finally:
        release()


class HangingServer:
    """A TCP listener on 127.0.0.1 that accepts connections, reads and discards what arrives,
    and never answers: a clamd that hangs mid-scan."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                pass
            else:
                conn.setblocking(False)
                self._conns.append(conn)
                self.accepted += 1
            for c in list(self._conns):
                with contextlib.suppress(BlockingIOError, OSError):
                    while c.recv(65536):
                        pass

    def __enter__(self) -> HangingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns:
            c.close()
        self.sock.close()
