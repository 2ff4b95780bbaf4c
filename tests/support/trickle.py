"""A slow client for the DATA-timing tests: send small pieces at a fixed pace until the server
answers (or closes), so a test can read the reply and how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.support.smtpclient import RawSmtpClient


def trickle_until_answer(c: RawSmtpClient, piece: Callable[[int], bytes], *, every_s: float,
                         count: int, reply_timeout_s: float) -> float:
    """Send ``piece(0)``, ``piece(1)``, ... one every ``every_s`` (at most ``count``) until the
    server sends something or drops the connection; leave what it sent in ``c.buf`` for
    ``c.reply_lines()`` (with ``reply_timeout_s`` for the rest) and return the seconds waited."""
    t0 = time.monotonic()
    c.sock.settimeout(every_s)
    got = b""
    for i in range(count):
        try:
            c.send(piece(i))
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            got = c.sock.recv(65536)
            break
        except TimeoutError:
            continue
    waited = time.monotonic() - t0
    c.buf = got
    c.sock.settimeout(reply_timeout_s)
    return waited
