"""A private, throw-away Postfix instance: a real downstream MTA for integration tests.

``PostfixInstance(workdir)`` writes its own ``main.cf``/``master.cf`` from scratch, runs its own
``master(8)`` in the foreground as a child of the test process and accepts mail on
``127.0.0.1:<free high port>`` for a few test domains, which it delivers into one Maildir. It
never touches the machine's Postfix (``/etc/postfix`` is only read for the shared
``postfix-files``/``dynamicmaps.cf`` metadata), never listens on anything but 127.0.0.1 and never
sends mail anywhere.

Usage::

    with PostfixInstance(tmp_path / "postfix") as pf:
        smtplib.SMTP(pf.host, pf.port).sendmail("a@sender.test", ["b@example.test"], raw)
        [msg] = pf.wait_for_messages(1)

Needs: Linux, root (``master`` refuses to run otherwise), the Debian ``postfix`` package >= 3.4
(for ``maillog_file``/postlogd) with its ``postfix`` user and ``postdrop`` group.
``postfix_available()`` checks all of that, for skip markers.

Layout of ``workdir`` (everything instance-specific lives here, so instances never collide)::

    etc/main.cf, etc/master.cf   config_directory (``postfix -c``, ``master -c``)
    spool/                       queue_directory (also the chroot of the virtual agent)
    spool/Maildir/{new,cur,tmp}  the catch-all Maildir (``PostfixInstance.maildir``)
    spool/data/                  data_directory (master.lock, caches)
    maillog                      all Postfix logging (postlogd), see ``log_lines()``
    master.out                   stdout/stderr of master and of our reaper process

main.cf decisions (see ``_main_cf``; ``smtpd_options`` can override or add any parameter):

* ``compatibility_level = 3.6`` (``2`` on Postfix < 3.6): current defaults, no
  "backwards-compatible default setting" warnings.
* Own ``queue_directory = <workdir>/spool`` and ``data_directory = data`` -- relative, i.e.
  ``spool/data``: master opens ``data/master.lock`` after dropping to the postfix user, who could
  not traverse pytest's mode-0700 basetemp with an absolute path (all daemons chdir to the queue
  directory first, as root). ``mail_owner = postfix``,
  ``setgid_group = postdrop``; ``multi_instance_enable = no`` and empty
  ``multi_instance_directories``/``multi_instance_wrapper`` (so the Debian multi-instance wrapper
  never steps in); ``import_environment`` is the default minus X11 variables and the helper starts
  Postfix with a minimal environment (no inherited ``MAIL_CONFIG``/``MAIL_LOGTAG``...).
* Logging: ``maillog_file = <workdir>/maillog``, ``maillog_file_prefixes = <workdir>``, a
  ``postlog unix-dgram`` service in master.cf; ``syslog_name = postfix-mailgate-test``. No syslog
  needed.
* Network: ``inet_interfaces = 127.0.0.1``, ``inet_protocols = ipv4``; master.cf has one smtpd,
  on ``127.0.0.1:<port>`` (the port comes from binding port 0); ``mynetworks = 127.0.0.0/8``.
* Domains: ``virtual_mailbox_domains = <domains>``, ``mydestination =`` (nothing is "local"),
  ``virtual_mailbox_maps = static:Maildir/`` — a catch-all: every local part of every domain is
  accepted and all of it lands in the ONE Maildir ``spool/Maildir``, one file per recipient (each
  with its own ``Delivered-To``/``X-Original-To``; ``Return-Path`` is the envelope sender).
  The ``virtual`` agent runs chrooted in the queue directory (``virtual_mailbox_base = /`` is that
  chroot) as ``nobody`` (``virtual_uid_maps``/``virtual_gid_maps = static:<nobody>``), which is what
  lets delivery work under pytest's 0700 temp directories.
* No outbound mail: ``default_transport``, ``relay_transport`` and ``local_transport`` are all
  ``error:``, ``relay_domains =``. smtpd therefore answers RCPT TO for any other domain with
  ``550 5.1.1 ... Recipient address rejected`` (even from mynetworks), nothing is ever relayed.
* No DNS: ``smtp_dns_support_level = disabled``, ``lmtp_dns_support_level = disabled``,
  ``smtpd_peername_lookup = no`` (clients log as ``unknown[127.0.0.1]``), fixed ``myhostname``
  (``downstream.mailgate.test``, override with ``smtpd_options={"myhostname": ...}``).
* Content kept as sent: ``local_header_rewrite_clients =`` (no header rewriting or added
  Date/Message-ID/From for loopback clients), ``append_dot_mydomain = no``,
  ``swap_bangpath = no``, ``allow_percent_hack = no``. Postfix still prepends ``Received:``, and
  the virtual agent ``Return-Path:``, ``Delivered-To:``, ``X-Original-To:``.
* Speed: ``in_flow_delay = 0s``, ``smtpd_error_sleep_time = 0s``, ``queue_run_delay = 1s``,
  ``minimal_backoff_time = 1s``, ``maximal_backoff_time = 2s``; new mail is delivered at once.

Process handling: ``start()`` runs ``postfix -c etc check`` (creates the queue directories with
the right owners, as ``postfix start`` would) and then ``master -c etc`` in the foreground under a
tiny Python "reaper" (our direct child, a Linux child-subreaper). Master puts itself in its own
session/process group; on ``stop()`` the reaper passes SIGTERM to master, master passes it to its
process group and exits, and the reaper collects every orphaned Postfix process before it exits
itself, so once ``stop()`` returns nothing of the instance is left, not even zombies (even when
PID 1 does not reap). If the test process dies without ``stop()``, the reaper sees EOF on its
stdin and shuts the instance down the same way. Readiness = the smtpd port answers with ``220``
(about 0.3 s after start() is called; stop() takes about 20 ms). main.cf/master.cf get an mtime
in the past: Postfix programs pause 300 ms per read while main.cf is "too new" (~2 s otherwise).

Any workdir works, including pytest's 0700 ``tmp_path``: nothing of the instance is reached by an
absolute path as an unprivileged user (see data_directory and the virtual chroot above; postlogd
opens the maillog and daemons connect to the postlog socket before they drop privileges).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from types import TracebackType

__all__ = ["PostfixInstance", "PostfixError", "postfix_available", "postfix_unavailable_reason"]

HOST = "127.0.0.1"
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MIN_VERSION = (3, 4)  # maillog_file + postlogd
# Characters that would be misparsed in main.cf values (lists, $expansion, comments).
_UNSAFE_PATH = re.compile(r"[\s,$#{}=\\\"']")
_PARAM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

# Runs as our direct child: forks master, becomes the parent (subreaper) of every process master
# leaves behind, and exits only when all of them are gone. argv: log file, then master's argv.
_REAPER = r"""
import ctypes, os, signal, sys, threading
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
log, argv = sys.argv[1], sys.argv[2:]
pid = None
master_alive = True
stop_requested = False
def stop(*_):
    global stop_requested
    stop_requested = True
    if pid is not None and master_alive:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGTERM, stop)  # before fork: no window where SIGTERM kills only us
signal.signal(signal.SIGINT, stop)
pid = os.fork()
if pid == 0:
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
if stop_requested:
    stop()
sys.stdout.write("%d\n" % pid)
sys.stdout.flush()
def watch_parent():
    try:
        while os.read(0, 512):
            pass
    except OSError:
        pass
    stop()
threading.Thread(target=watch_parent, daemon=True).start()
code = 0
while True:
    try:
        p, status = os.wait()
    except ChildProcessError:
        break
    if p == pid:
        master_alive = False
        code = os.waitstatus_to_exitcode(status)
        print("reaper: master exited with", code, file=sys.stderr, flush=True)
sys.exit(code if code >= 0 else 128 - code)
"""


class PostfixError(RuntimeError):
    """The private Postfix instance could not be set up, started or stopped."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SBIN_PATH + ":" + os.environ.get("PATH", ""))


def _clean_env() -> dict[str, str]:
    env = {"PATH": _SBIN_PATH, "LANG": "C", "LC_ALL": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


@cache
def _postconf_defaults() -> dict[str, str]:
    postconf = _which("postconf")
    if postconf is None:
        raise PostfixError("postconf not found")
    names = ["mail_version", "daemon_directory", "command_directory"]
    out = subprocess.run(
        [postconf, "-d", *names],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=30,
        check=True,
    ).stdout
    values = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


@cache
def postfix_unavailable_reason() -> str | None:
    """Why a private Postfix instance cannot run here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "private Postfix instances need Linux"
    if os.geteuid() != 0:
        return "Postfix master(8) must run as root"
    for cmd in ("postfix", "postconf"):
        if _which(cmd) is None:
            return f"{cmd} not installed (Debian package 'postfix')"
    try:
        conf = _postconf_defaults()
    except (OSError, subprocess.SubprocessError, PostfixError) as exc:
        return f"postconf -d failed: {exc}"
    version = _version_tuple(conf.get("mail_version", "0"))
    if version < _MIN_VERSION:
        return f"Postfix {conf.get('mail_version')} is too old (need >= 3.4 for maillog_file)"
    daemons = Path(conf.get("daemon_directory", "/usr/lib/postfix/sbin"))
    for daemon in ("master", "smtpd", "virtual", "postlogd", "cleanup", "qmgr", "postfix-script"):
        if not os.access(daemons / daemon, os.X_OK):
            return f"{daemons / daemon} missing"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError as exc:
        return f"Postfix account missing: {exc}"
    return None


def postfix_available() -> bool:
    """True if ``PostfixInstance`` can run on this machine (for pytest skip markers)."""
    return postfix_unavailable_reason() is None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


class PostfixInstance:
    """A private Postfix on 127.0.0.1:``port`` that delivers ``domains`` into ``maildir``.

    ``smtpd_options`` are extra main.cf parameters (they override the defaults, e.g.
    ``{"smtpd_recipient_restrictions": "reject_unauth_destination, ...",
    "message_size_limit": "20000000"}``); values are written verbatim, one line each.
    ``lmtp`` is accepted for interface compatibility only: Postfix has no LMTP *server*, so
    ``lmtp=True`` raises ``ValueError``.
    """

    host: str = HOST

    def __init__(
        self,
        workdir: Path | str,
        *,
        domains: Iterable[str] = ("example.test",),
        lmtp: bool = False,
        smtpd_options: Mapping[str, str] | None = None,
        start_timeout_s: float = 15.0,
    ) -> None:
        if lmtp:
            raise ValueError("Postfix has no LMTP server (lmtp(8) is a client); no LMTP listener")
        self.workdir = Path(workdir).absolute()
        if _UNSAFE_PATH.search(str(self.workdir)):
            raise ValueError(f"workdir path unusable in main.cf: {self.workdir!r}")
        self.domains = tuple(domains)
        if not self.domains or any(not re.fullmatch(r"[A-Za-z0-9.-]+", d) for d in self.domains):
            raise ValueError(f"bad domains: {self.domains!r}")
        self.smtpd_options = dict(smtpd_options or {})
        for name, value in self.smtpd_options.items():
            if not _PARAM_NAME.match(name) or "\n" in str(value):
                raise ValueError(f"bad main.cf parameter: {name!r} = {value!r}")
        self.start_timeout_s = start_timeout_s
        self.config_dir = self.workdir / "etc"
        self.queue_dir = self.workdir / "spool"
        self.data_dir = self.queue_dir / "data"
        self.maildir = self.queue_dir / "Maildir"
        self.maillog = self.workdir / "maillog"
        self.master_out = self.workdir / "master.out"
        self.port: int = 0  # chosen by the first start(), kept across restarts
        self.master_pid: int | None = None  # of the running (or last) master
        self.check_output = ""  # what the last `postfix check` printed
        self._reaper: subprocess.Popen[bytes] | None = None

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.master_pid}" if self.running else "stopped"
        return f"<PostfixInstance {self.host}:{self.port} {state} {self.workdir}>"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._reaper is not None and self._reaper.poll() is None

    @property
    def root_pid(self) -> int | None:
        """The reaper's PID while started: every process of the instance descends from it
        (bench/run.py sums their CPU and RSS)."""
        return self._reaper.pid if self._reaper is not None else None

    def start(self) -> None:
        """Write the config, create the queue, start master, wait for the smtpd greeting."""
        if self._reaper is not None:
            raise PostfixError(f"already started: {self!r}")
        reason = postfix_unavailable_reason()
        if reason is not None:
            raise PostfixError(f"Postfix unavailable: {reason}")
        self._prepare_dirs()
        first_start = self.port == 0
        attempts = 3 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self.port = _free_port()
            self._write_config()
            self._postfix_check()
            try:
                self._launch()
                return
            except _MasterDiedError:
                # master logs start-up fatals only to syslog (postlogd is not up yet), so guess:
                # retry on a fresh port only if something else really holds this one.
                port_taken = not _port_free(self.port)
                if not port_taken or attempt == attempts - 1:
                    cause = f"port {self.port} is taken" if port_taken else "not a port clash"
                    hint = f"{self._master_path()} -c {self.config_dir} -v"
                    raise PostfixError(
                        f"master exited during start-up ({cause}); it logs that only to "
                        f"syslog: run `{hint}` by hand to see why; log:\n{self._log_tail()}"
                    ) from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop master and every process it started; returns once all of them are gone."""
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        try:
            if reaper.poll() is None:
                reaper.send_signal(signal.SIGTERM)  # the reaper passes it on to master
                try:
                    reaper.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self._kill_descendants(reaper.pid)
                    try:
                        reaper.wait(5)
                    except subprocess.TimeoutExpired:
                        reaper.kill()
                        reaper.wait(5)
        finally:
            for pipe in (reaper.stdin, reaper.stdout):
                if pipe is not None:
                    pipe.close()

    # -- mail and logs ---------------------------------------------------------------------

    def message_paths(self) -> list[Path]:
        """Delivered message files (Maildir new/ and cur/), oldest first."""
        paths: list[Path] = []
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if folder.is_dir():
                paths.extend(p for p in folder.iterdir() if p.is_file())

        def key(p: Path) -> tuple[int, str]:
            try:
                return p.stat().st_mtime_ns, p.name
            except FileNotFoundError:
                return 0, p.name

        return sorted(paths, key=key)

    def messages(self) -> list[bytes]:
        """The delivered messages as raw bytes (one per recipient), oldest first."""
        out = []
        for path in self.message_paths():
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:  # moved new/ -> cur/ meanwhile; rare, skip
                continue
        return out

    def wait_for_messages(
        self, n: int, timeout_s: float = 20, *, containing: bytes | None = None
    ) -> list[bytes]:
        """Wait until at least ``n`` messages were delivered; return all of them.

        With ``containing``, only messages that contain those bytes count and are returned
        (handy when several tests share one instance: put a unique token in each message).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            msgs = self.messages()
            if containing is not None:
                msgs = [m for m in msgs if containing in m]
            if len(msgs) >= n:
                return msgs
            if time.monotonic() >= deadline:
                what = f" containing {containing!r}" if containing is not None else ""
                raise TimeoutError(
                    f"{len(msgs)} of {n} messages{what} delivered after {timeout_s}s; "
                    f"log:\n{self._log_tail()}"
                )
            if self._reaper is None or self._reaper.poll() is not None:
                raise PostfixError(f"Postfix is not running; log:\n{self._log_tail()}")
            time.sleep(0.05)

    def clear_messages(self) -> None:
        """Delete all delivered messages (e.g. between tests sharing one instance)."""
        for path in self.message_paths():
            path.unlink(missing_ok=True)

    def log_lines(self) -> list[str]:
        """Lines of this instance's maillog (written by postlogd, a little asynchronously)."""
        try:
            return self.maillog.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout_s: float = 10) -> str:
        """Wait for a maillog line matching the regex ``pattern``; return that line."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_lines():
                if regex.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no log line matching {regex.pattern!r}:\n{self._log_tail()}")
            time.sleep(0.05)

    # -- internals -------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in (self.config_dir, self.queue_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, 0, 0)
            d.chmod(0o755)  # postfix check warns about group/other-writable root dirs
        uid, gid = _nobody()
        for d in (self.maildir, *(self.maildir / s for s in ("tmp", "new", "cur"))):
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
            d.chmod(0o700)

    def _main_cf(self) -> dict[str, str]:
        version = _version_tuple(_postconf_defaults()["mail_version"])
        uid, gid = _nobody()
        refuse = "outbound delivery is disabled in this private test instance"
        params = {
            "compatibility_level": "3.6" if version >= (3, 6) else "2",
            # -- own everything: layout, accounts, environment
            "queue_directory": str(self.queue_dir),
            # Relative, i.e. <queue_directory>/data: master opens data/master.lock only after
            # dropping privileges, and the postfix user cannot traverse pytest's 0700 tmp dirs.
            "data_directory": "data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "multi_instance_enable": "no",
            "multi_instance_directories": "",
            "multi_instance_wrapper": "",
            "import_environment": (
                "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C POSTLOG_SERVICE POSTLOG_HOSTNAME"
            ),
            # -- logging without syslog
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir),
            "syslog_name": "postfix-mailgate-test",
            # -- identity, network
            "myhostname": "downstream.mailgate.test",
            "mydomain": "mailgate.test",
            "myorigin": "$myhostname",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # -- what is accepted and where it goes
            "mydestination": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": "/",  # = queue_directory, the virtual agent's chroot
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_transport": "virtual",
            "local_transport": f"error:5.1.1 local delivery: {refuse}",
            "default_transport": f"error:5.1.1 {refuse}",
            "relay_transport": f"error:5.1.1 {refuse}",
            # -- no DNS
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtpd_peername_lookup": "no",
            # -- keep messages as sent
            "local_header_rewrite_clients": "",
            "append_dot_mydomain": "no",
            "swap_bangpath": "no",
            "allow_percent_hack": "no",
            "biff": "no",
            # -- fast
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        params.update(self.smtpd_options)
        return params

    def _master_cf(self) -> str:
        # service type private unpriv chroot wakeup maxproc command
        rows = [
            (f"{HOST}:{self.port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),  # for smtpd TLS options
            # chroot = y: the queue directory becomes "/" for virtual_mailbox_base
            ("virtual", "unix", "-", "n", "y", "-", "-", "virtual"),
        ]
        lines = ["# Written by tests/support/postfix.py -- private test instance."]
        lines += ["{:<20} {:<10} {:<3} {:<3} {:<3} {:<6} {:<3} {}".format(*r) for r in rows]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        main_cf = ["# Written by tests/support/postfix.py -- private test instance."]
        main_cf += [f"{k} = {v}".rstrip() for k, v in self._main_cf().items()]
        files = {"main.cf": "\n".join(main_cf) + "\n", "master.cf": self._master_cf()}
        # Postfix re-reads a main.cf modified within the last second or so, pausing 300 ms each
        # time ("let it settle down"): ~2 s per command. Backdating the files avoids that.
        past = time.time() - 60
        for name, text in files.items():
            (self.config_dir / name).write_text(text)
            os.utime(self.config_dir / name, (past, past))

    def _postfix_check(self, timeout_s: float = 60) -> None:
        """``postfix -c etc check``: creates missing queue dirs, checks the config.

        Postfix commands print their errors to stderr only when it is a terminal (otherwise only
        to syslog/maillog, and config errors come before maillog is known), so give it a pty.
        """
        postfix = _which("postfix")
        assert postfix is not None
        master_fd, slave_fd = os.openpty()
        try:
            proc = subprocess.Popen(
                [postfix, "-c", str(self.config_dir), "check"],
                stdin=subprocess.DEVNULL,
                stdout=slave_fd,
                stderr=slave_fd,
                env=_clean_env(),
                cwd=self.workdir,
                close_fds=True,
            )
        finally:
            os.close(slave_fd)
        chunks = []
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                ready, _, _ = select.select([master_fd], [], [], deadline - time.monotonic())
                if not ready:
                    proc.kill()
                    proc.wait()
                    raise PostfixError(f"postfix check hung for {timeout_s}s")
                try:
                    data = os.read(master_fd, 4096)
                except OSError:  # EIO: every holder of the pty's other end has exited
                    break
                if not data:
                    break
                chunks.append(data)
            returncode = proc.wait(timeout_s)
        finally:
            os.close(master_fd)
        self.check_output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        if returncode != 0:
            raise PostfixError(
                f"postfix check failed ({returncode}):\n{self.check_output}"
                f"\nlog:\n{self._log_tail()}"
            )

    def _master_path(self) -> str:
        return str(Path(_postconf_defaults()["daemon_directory"]) / "master")

    def _launch(self) -> None:
        argv = [sys.executable, "-I", "-c", _REAPER, str(self.master_out), self._master_path()]
        with self.master_out.open("ab") as out:
            reaper = subprocess.Popen(
                [*argv, "-c", str(self.config_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                env=_clean_env(),
                cwd=self.workdir,
                start_new_session=True,
                close_fds=True,
            )
        self._reaper = reaper
        try:
            self.master_pid = self._read_master_pid(reaper)
            self._wait_ready(reaper)
        except BaseException:
            self.stop()
            raise

    def _read_master_pid(self, reaper: subprocess.Popen[bytes]) -> int:
        assert reaper.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(reaper.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=self.start_timeout_s):
                raise PostfixError("reaper process did not report the master PID")
        line = reaper.stdout.readline()
        if not line.strip().isdigit():
            raise PostfixError(f"reaper process failed; see {self.master_out}")
        return int(line)

    def _wait_ready(self, reaper: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if reaper.poll() is not None:
                raise _MasterDiedError  # during start-up: a bind failure, mostly
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    # short: if master died, whatever holds the port may never greet
                    greeting = s.recv(512)
                    if greeting.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    last_error = PostfixError(f"unexpected greeting {greeting!r}")
            except OSError as exc:
                last_error = exc
            time.sleep(0.02)
        raise PostfixError(
            f"smtpd on {self.host}:{self.port} not ready after {self.start_timeout_s}s "
            f"({last_error}); log:\n{self._log_tail()}"
        )

    def _kill_descendants(self, reaper_pid: int) -> None:
        """Last resort: SIGKILL every process whose parent is the reaper or the master."""
        parents = {reaper_pid, self.master_pid}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in parents:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _log_tail(self, n: int = 30) -> str:
        lines = self.log_lines()[-n:]
        try:
            out = self.master_out.read_text(errors="replace").strip()
        except FileNotFoundError:
            out = ""
        if out:
            lines.append(f"[{self.master_out.name}] {out[-2000:]}")
        return "\n".join(lines) or "(empty)"


class _MasterDiedError(Exception):
    pass
