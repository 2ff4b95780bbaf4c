"""Send one message through smtplib (EHLO client.test, MAIL bob@sender.test, one RCPT) and
return the queue id from the 250 reply to DATA; any other reply fails the test."""

from __future__ import annotations

import smtplib


def send_accepted(address: tuple[str, int], rcpt: str, data: bytes, *,
                  timeout_s: float = 20) -> str:
    """The queue id the gateway gave ``data``: the last word of its 250 reply to DATA."""
    with smtplib.SMTP(*address, timeout=timeout_s) as s:
        s.ehlo("client.test")
        s.mail("bob@sender.test")
        s.rcpt(rcpt)
        code, text = s.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]
