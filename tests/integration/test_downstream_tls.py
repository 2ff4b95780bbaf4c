"""STARTTLS to the downstream, against a real Postfix: opportunistic by default, required
(encrypt) or verified (verify) per host, and refusing to send in clear when TLS is required."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway import base_policy
from tests.support.postfix import PostfixInstance, postfix_available
from tests.support.sink import Sink

pytestmark = [
    pytest.mark.skipif(not postfix_available(), reason="postfix not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]


def make_cert(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_postfix(tmp_path_factory):
    d = tmp_path_factory.mktemp("pftls")
    d.chmod(0o755)
    cert, key = make_cert(d)
    cert.chmod(0o644)
    pf = PostfixInstance(d / "pf", smtpd_options={
        "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key),
        "smtpd_tls_security_level": "may", "smtpd_tls_received_header": "yes"})
    pf.start()
    yield pf, cert
    pf.stop()


def send(gw, subject: str) -> None:
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.sendmail("a@sender.test", ["alice@example.test"],
                   f"Subject: {subject}\r\n\r\nbody\r\n".encode())


@pytest.mark.parametrize("mode", ["proxy", "queue"])
@pytest.mark.parametrize("level", ["may", "encrypt", "verify"])
def test_downstream_gets_tls(gateway_factory, tls_postfix, mode, level):
    pf, cert = tls_postfix
    subject = f"tls-{mode}-{level}"
    gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{pf.port}",
                                     relay={"mode": mode, "starttls": level,
                                            "tls_ca_file": str(cert)},
                                     queue={"scan_interval_s": 0.2}))
    send(gw, subject)
    [msg] = pf.wait_for_messages(1, containing=subject.encode())
    top = msg.split(b"\r\n\r\n", 1)[0]
    assert b"with ESMTPS" in top, top[:600]  # Postfix's own Received: says TLS was used


def test_verify_fails_against_an_untrusted_certificate(gateway_factory, tls_postfix, tmp_path):
    pf, _ = tls_postfix
    other, _ = make_cert(tmp_path)  # a CA that did not sign Postfix's certificate
    gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{pf.port}",
                                     relay={"starttls": "verify", "tls_ca_file": str(other)}))
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("alice@example.test")
    assert code == 451 and text.startswith(b"4.4.")  # never sent in clear
    assert b"verify" not in text  # no internals for the client
    assert any("TLS handshake" in line for line in gw.lines())


def test_required_tls_is_not_offered(gateway_factory):
    with Sink() as sink:  # the sink offers no STARTTLS
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}",
                                         relay={"starttls": "encrypt"}))
        with smtplib.SMTP(*gw.address, timeout=20) as s:
            s.ehlo("c.test")
            s.mail("a@sender.test")
            code, _ = s.rcpt("alice@example.test")
        assert code == 451
        assert not any(c.upper().startswith("MAIL") for c in sink.commands)


def test_opportunistic_tls_without_starttls_sends_in_clear(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}"))
        send(gw, "clear")
        [msg] = sink.wait_for(1, 10)
        assert b"Subject: clear" in msg.data
