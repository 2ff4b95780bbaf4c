"""What the gateway needs from its environment before it starts, each problem one line naming the
file or address and the reason: a spool directory it can create and write, held by one gateway
at a time (an ``flock`` on ``<spool>/gateway.lock``), TLS files it can read and load, listen
addresses it may bind. ``mailgate check-policy`` checks them without touching anything
(``spool_problem``, ``tls_context``); ``mailgate run`` takes them (``lock_spool``), and turns a
failed bind into one line (``listen_problem``). Kept free of the engine: the supervisor imports
this."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import PolicyError, StartupError
from gateway.policy.schema import Policy
from gateway.queue_entry import QUEUE_AREAS

if TYPE_CHECKING:
    import ssl

LOCK_NAME = "gateway.lock"
# the spool's subdirectories (gateway/spool.py), each written to
SPOOL_AREAS = ("incoming", *QUEUE_AREAS, "corrupt", "data", "spare")
SPOOL_FILES = (LOCK_NAME, "quarantine.db", "quarantine.db-wal", "quarantine.db-shm")
CAP_NET_BIND_SERVICE = 10  # linux/capability.h


def spool_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be the spool (None if it can): it, or the nearest existing
    directory it would be created in, must be a directory this process may write. Nothing is
    created or changed."""
    problem = _directory_problem(directory, "spool directory")
    if problem is None and directory.is_dir():  # its areas too (a `chown` without -R, say)
        for sub in SPOOL_AREAS:
            area = directory / sub
            if area.exists() and (problem := _directory_problem(area, "spool directory")):
                return problem
        for name in SPOOL_FILES:  # the lock, the quarantine's index and its journal
            file = directory.absolute() / name
            if file.is_file() and not os.access(file, os.W_OK):
                return _unwritable(file, f"spool file {file}")
    return problem


def maildir_problems(policy: Policy) -> list[str]:
    """``FILE: key: reason`` for each ``maildir:`` transport (``relay.downstream``,
    ``relay.transport.D``) whose directory this process cannot create or write (its ``new/``
    and ``tmp/`` too, where they exist): every message for it would be deferred, retried for
    days and bounced."""
    out = []
    routes = [("relay.downstream", policy.relay.downstream),
              *((f"relay.transport.{d}", t) for d, t in policy.relay.transport.items())]
    for key, t in routes:
        if t.kind != "maildir" or t.path is None:
            continue
        problem = _directory_problem(t.path, "maildir")
        for sub in ("tmp", "new"):
            if problem is None and (t.path / sub).exists():
                problem = _directory_problem(t.path / sub, "maildir")
        if problem:
            out.append(f"{policy.source}: {key}: {problem}")
    return out


def _directory_problem(directory: Path, what: str) -> str | None:
    path = directory.absolute()
    if path.exists():
        if not path.is_dir():
            return f"{what} {path}: not a directory"
        return _unwritable(path, f"{what} {path}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{what} {path}: cannot create: {parent} is not a directory"
    return _unwritable(parent, f"{what} {path}: cannot create in {parent}")


def _unwritable(path: Path, prefix: str) -> str | None:
    if os.access(path, os.W_OK | os.X_OK):
        return None
    # access(2) fails with EROFS on a read-only file system, EACCES for permissions
    reason = "read-only file system" if _read_only(path) else \
        f"permission denied (uid {os.geteuid()})"
    return f"{prefix}: not writable: {reason}"


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def lock_spool(directory: Path) -> int:
    """Create the spool directory if need be and take its lock for this gateway: an exclusive
    ``flock`` on ``<directory>/gateway.lock``, which then holds this process's PID. Returns the
    descriptor, to be kept open for the gateway's whole life; forked workers inherit it (the
    lock belongs to the open file, so it lasts while any of them lives, e.g. draining after the
    supervisor was killed). StartupError: the directory cannot be created or written, or
    another gateway holds it (``spool DIR is in use by pid N``)."""
    path = directory.absolute()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise StartupError(f"spool directory {path}: not a directory") from None
    except OSError as e:
        raise StartupError(f"spool directory {path}: cannot create: {e.strerror}") from None
    problem = spool_problem(path)
    if problem:
        raise StartupError(problem)
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StartupError(f"spool directory {path}: cannot open {LOCK_NAME}: "
                           f"{e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"spool {path} is in use by pid {_holder(lock)}") from None
    except OSError as e:
        os.close(fd)
        raise StartupError(f"spool directory {path}: cannot lock {LOCK_NAME}: "
                           f"{e.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # e.g. the disk is full: the lock holds all the same
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    return fd


def _holder(lock: Path) -> str:
    """The PID written in a held lock file ("?" in the instant before its holder writes it)."""
    for _ in range(50):
        try:
            text = lock.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit():
            return text
        time.sleep(0.01)
    return "?"


def check_tls_files(policy: Policy) -> None:
    """PolicyError naming a TLS file of ``policy`` this process cannot read (without loading
    ``ssl``, which the supervisor never needs)."""
    for key in ("cert_file", "key_file"):
        file = getattr(policy.tls, key)
        if file is None:
            continue
        try:
            with open(file, "rb"):
                pass
        except OSError as e:
            raise PolicyError([f"{policy.source}: tls.{key}: cannot read {file}: "
                               f"{e.strerror}"]) from None


def tls_context(policy: Policy) -> ssl.SSLContext | None:
    """The server TLS context of ``policy`` (None without ``[tls]``); PolicyError naming the
    file that cannot be read, or the pair that does not load."""
    if not policy.tls.enabled:
        return None
    check_tls_files(policy)
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    asked: list[bool] = []

    def no_passphrase() -> bytes:  # else OpenSSL asks for one on the terminal, and waits
        asked.append(True)
        return b""

    try:
        ctx.load_cert_chain(str(policy.tls.cert_file), str(policy.tls.key_file),
                            password=no_passphrase)
    except (OSError, ssl.SSLError) as e:
        if asked:
            raise PolicyError([f"{policy.source}: tls.key_file: {policy.tls.key_file} is "
                               f"encrypted (it needs a passphrase): give an unencrypted key "
                               f"(openssl pkey -in {policy.tls.key_file} -out KEY)"]) from None
        raise PolicyError(_pem_problems(policy) or [
            f"{policy.source}: tls: cannot load certificate/key: {e} (cert_file "
            f"{policy.tls.cert_file}, key_file {policy.tls.key_file})"]) from None
    return ctx


def _pem_problems(policy: Policy) -> list[str]:
    """Which TLS file is not what its key says (OpenSSL says only "PEM lib"): a cert_file
    without a PEM certificate, a key_file without a PEM private key, or the two swapped."""
    out = []
    for key, marker, what in (("cert_file", b"-----BEGIN CERTIFICATE-----", "certificate"),
                              ("key_file", b"PRIVATE KEY-----", "private key")):
        file = getattr(policy.tls, key)
        try:
            with open(file, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        if marker not in data:
            swapped = (b"PRIVATE KEY-----" in data if key == "cert_file"
                       else b"-----BEGIN CERTIFICATE-----" in data)
            out.append(f"{policy.source}: tls.{key}: {file} holds no PEM {what}"
                       + (" (cert_file and key_file swapped?)" if swapped else ""))
    return out


def listen_problem(host: str, port: int, error: OSError, *, euid: int | None = None,
                   cap_net_bind: bool | None = None,
                   unprivileged_start: int | None = None) -> str:
    """One line for a listen address that cannot be bound. The keyword arguments default to
    this process's (tests inject them)."""
    where = f"listen {host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"{where}: address already in use (another mailgate or MTA listens there?)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: address not available on this host"
    if error.errno in (errno.EACCES, errno.EPERM):
        euid = os.geteuid() if euid is None else euid
        start = unprivileged_port_start() if unprivileged_start is None else unprivileged_start
        cap = has_capability(CAP_NET_BIND_SERVICE) if cap_net_bind is None else cap_net_bind
        if port < start and euid != 0 and not cap:
            return (f"{where}: permission denied: ports below {start} need root or the "
                    f"CAP_NET_BIND_SERVICE capability (running as uid {euid})")
        return f"{where}: permission denied"
    return f"{where}: {error.strerror or error}"


def unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def has_capability(bit: int) -> bool:
    """Whether this process's effective capability set holds ``bit`` (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False
