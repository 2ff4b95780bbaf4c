"""gateway/preflight.py without a gateway: the one-line reasons for a listen address that cannot
be bound (privilege judged from an injected uid, capability and port floor), and for a spool
directory that cannot be created or written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gateway.errors import StartupError
from gateway.preflight import listen_problem, lock_spool, spool_problem


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def test_a_port_below_the_floor_as_non_root_says_what_it_needs():
    text = listen_problem("0.0.0.0", 25, _err(errno.EACCES), euid=1000, cap_net_bind=False,
                          unprivileged_start=1024)
    assert text == ("listen 0.0.0.0:25: permission denied: ports below 1024 need root or the "
                    "CAP_NET_BIND_SERVICE capability (running as uid 1000)")


@pytest.mark.parametrize("euid,cap,start", [(0, False, 1024), (1000, True, 1024),
                                            (1000, False, 0)])
def test_no_privilege_hint_where_privilege_is_not_the_reason(euid, cap, start):
    assert listen_problem("127.0.0.1", 25, _err(errno.EACCES), euid=euid, cap_net_bind=cap,
                          unprivileged_start=start) == "listen 127.0.0.1:25: permission denied"


def test_address_in_use_and_not_available():
    assert listen_problem("127.0.0.1", 2525, _err(errno.EADDRINUSE)) == (
        "listen 127.0.0.1:2525: address already in use (another mailgate or MTA listens "
        "there?)")
    assert listen_problem("192.0.2.1", 2525, _err(errno.EADDRNOTAVAIL)) == (
        "listen 192.0.2.1:2525: address not available on this host")


def test_spool_problems(tmp_path: Path):
    assert spool_problem(tmp_path / "a" / "b") is None  # creatable
    (tmp_path / "file").write_text("x")
    assert spool_problem(tmp_path / "file") == f"spool directory {tmp_path / 'file'}: not a " \
                                               "directory"
    assert spool_problem(tmp_path / "file" / "spool") == (
        f"spool directory {tmp_path / 'file' / 'spool'}: cannot create: {tmp_path / 'file'} "
        "is not a directory")
    assert not (tmp_path / "a").exists()  # a check creates nothing


def test_the_lock_names_its_holder(tmp_path: Path):
    fd = lock_spool(tmp_path / "spool")
    try:
        assert (tmp_path / "spool" / "gateway.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StartupError) as e:  # another open file: flock refuses it
            lock_spool(tmp_path / "spool")
        assert str(e.value) == f"spool {tmp_path / 'spool'} is in use by pid {os.getpid()}"
    finally:
        os.close(fd)
    os.close(lock_spool(tmp_path / "spool"))  # free again once closed
