"""The SMTP front end's uses of aiosmtpd's and asyncio's internals prove themselves before the
first connection. A library that changed under it (simulated here by a ``sitecustomize`` that
alters the library in the gateway process before anything runs) leaves the library's own path
(or the feature off) in place, with exactly one warning line naming the patch, and mail still
flows through the real gateway."""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

from tests.integration.test_starttls import _policy
from tests.integration.test_starttls import cert as cert  # noqa: F401 - the fixture
from tests.integration.test_starttls import sink as sink  # noqa: F401 - the fixture
from tests.support.gateway import REPO, GatewayProcess
from tests.support.sink import Sink
from tests.support.smtpclient import RawSmtpClient

# asyncio's SSLProtocol after an upgrade that changed its constructor
NEW_SSLPROTO = """
import asyncio.sslproto as sp

_Old = sp.SSLProtocol


class SSLProtocol(_Old):
    def __init__(self, loop, app_protocol, sslcontext, handshake_waiter, server_side=False,
                 **kw):
        super().__init__(loop, app_protocol, sslcontext, handshake_waiter, server_side, **kw)


sp.SSLProtocol = SSLProtocol
"""


# aiosmtpd after an upgrade that renamed the timer callback the session overrides
NEW_AIOSMTPD_TIMER = """
import aiosmtpd.smtp as m

m.SMTP._on_timeout = m.SMTP._timeout_cb
del m.SMTP._timeout_cb


def _reset_timeout(self, duration=None):
    if self._timeout_handle is not None:
        self._timeout_handle.cancel()
    self._timeout_handle = self.loop.call_later(duration or self._timeout_duration,
                                                self._on_timeout)


m.SMTP._reset_timeout = _reset_timeout
"""


def _start_with(factory: Any, tmp_path: Path, sitecustomize: str, policy: dict[str, Any]
                ) -> GatewayProcess:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    gw: GatewayProcess = factory(policy, env={"PYTHONPATH": f"{site}:{REPO}"})
    return gw


def _patch_warnings(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [e for e in gw.events() if e.get("logger") == "mailgate.patches"]


def _send(gw: GatewayProcess, sink: Sink, subject: str) -> None:
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        s.sendmail("bob@example.org", ["alice@example.test"],
                   f"From: bob@example.org\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
                   f"\r\nhello\r\n".encode())
    got = sink.wait_for(1, timeout_s=10)
    assert f"Subject: {subject}".encode() in got[-1].data


def test_a_changed_sslprotocol_turns_starttls_off_and_mail_flows(gateway_factory, tmp_path,
                                                                 sink, cert):
    gw = _start_with(gateway_factory, tmp_path, NEW_SSLPROTO, _policy(sink, cert))
    [warning] = _patch_warnings(gw)
    assert warning["level"] == "warning"
    assert warning["msg"] == (
        "patch asyncio.sslproto.starttls disabled, the library's own path is used: "
        "asyncio.sslproto.SSLProtocol takes (loop, app_protocol, sslcontext, handshake_waiter, "
        "server_side, kw)")
    c = RawSmtpClient(gw.address)
    assert "STARTTLS" not in c.cmd("EHLO client.test")
    assert c.cmd("STARTTLS") == "502 5.5.1 STARTTLS not available"
    c.close()
    _send(gw, sink, "plaintext while TLS is off")


def test_starttls_is_checked_and_on_normally(gateway_factory, sink, cert):
    gw = gateway_factory(_policy(sink, cert))
    assert _patch_warnings(gw) == []
    c = RawSmtpClient(gw.address)
    assert "STARTTLS" in c.cmd("EHLO client.test")
    c.close()



def test_changed_aiosmtpd_hooks_run_the_session_on_asyncio_streams(gateway_factory, tmp_path,
                                                                   sink, cert):
    """Without the check, aiosmtpd's renamed timer would end sessions without our 421; with
    it, the session runs on asyncio's streams: mail flows, limits and the session timer hold."""
    policy = _policy(sink, cert, max_session_s=3)
    gw = _start_with(gateway_factory, tmp_path, NEW_AIOSMTPD_TIMER, policy)
    [warning] = _patch_warnings(gw)
    assert warning["level"] == "warning" and warning["msg"] == (
        "patch aiosmtpd.client-loop disabled, the library's own path is used: aiosmtpd's "
        "SMTP._reset_timeout no longer uses _timeout_cb")
    _send(gw, sink, "on asyncio streams")
    c = RawSmtpClient(gw.address)
    ehlo = c.cmd("EHLO client.test")
    assert "250-PIPELINING" in ehlo and "STARTTLS" not in ehlo  # its switch is aiosmtpd's
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=x") == "501 5.5.4 Bad SIZE parameter"
    assert c.cmd("RCPT TO:<alice@example.test>") == "503 5.5.1 Need MAIL command"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.reply().startswith("421 4.4.2 Session too long")  # the timer: ours, not aiosmtpd's
    c.close()
    conn = gw.wait_for(lambda e: e.get("event") == "connection" and e.get("end") == "max-session")
    assert conn["commands"] == 4


def test_check_policy_says_which_library_patch_is_off(tmp_path, sink, cert):
    """``check-policy`` runs the same checks ``run`` does and lists a patch that is off."""
    import os
    import re
    import subprocess
    import sys

    from tests.support import toml

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NEW_SSLPROTO)
    path = tmp_path / "p.toml"
    path.write_text(toml.dumps(_policy(sink, cert)))
    r = subprocess.run([sys.executable, "-m", "gateway", "check-policy", str(path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": f"{site}:{REPO}"})
    assert r.returncode == 0, r.stderr
    *_, count, off = r.stdout.splitlines()
    used, of = re.fullmatch(r"  library patches: (\d+) of (\d+) in use", count).groups()
    assert int(used) == int(of) - 1
    assert off == ("  library patch asyncio.sslproto.starttls: off, the library's own path is "
                   "used (asyncio.sslproto.SSLProtocol takes (loop, app_protocol, sslcontext, "
                   "handshake_waiter, server_side, kw))")
