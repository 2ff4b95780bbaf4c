"""``limits.min_data_rate_bytes_per_s`` / ``data_rate_grace_s`` on a real gateway process over
raw loopback sockets (issue 25, "slow clients cannot hold the door"): a client dribbling its
DATA is cut with ``421 4.4.2`` and disconnected after about the grace, not after
``data_timeout_s``; a client sending a multi-MB message slowly but steadily above the floor
gets its 250 and the message arrives whole."""

from __future__ import annotations

import re
import time

from tests.integration.test_limits import (
    BODY,
    connection_events,
    deliver_one,
    limits_policy,
    start_transaction,
)
from tests.support.smtpclient import RawSmtpClient
from tests.support.trickle import trickle_until_answer


def test_a_dribbler_is_cut_with_421_and_disconnected(gateway_factory):
    gw = gateway_factory(limits_policy(min_data_rate_bytes_per_s=1000, data_rate_grace_s=1,
                                       data_block_timeout_s=30, data_timeout_s=60))
    with RawSmtpClient(gw.address) as c:
        start_transaction(c)
        assert c.cmd("DATA").startswith("354 ")
        # one byte every 0.1 s (10 B/s) until the gateway answers: at most ~15 s (the old
        # gateway waited data_timeout_s)
        waited = trickle_until_answer(c, lambda i: BODY[i % len(BODY):i % len(BODY) + 1],
                                      every_s=0.1, count=150, reply_timeout_s=5)
        [line] = c.reply_lines()
        assert c.closed()  # the connection is closed after the 421
    m = re.fullmatch(r"421 4\.4\.2 Data too slow, closing connection \(([0-9A-Z]{16})\)",
                     line)
    assert m, line
    assert 0.9 <= waited <= 6.0, waited  # ~1 s of credit draining at 0.99 s per second
    why = gw.wait_for(lambda e: e.get("event") == "data-too-slow")
    assert why["qid"] == m.group(1) and why["min_rate_bytes_per_s"] == 1000
    assert 1 <= why["bytes"] <= 60, why
    assert gw.message_event(m.group(1))["action"] == "too-slow"
    assert connection_events(gw, 1)[0]["end"] == "data-too-slow"
    assert gw.maildir_messages() == []
    assert list((gw.workdir / "spool" / "incoming").iterdir()) == []
    deliver_one(gw)  # the gateway serves on


def test_a_slow_steady_multi_megabyte_upload_completes(gateway_factory):
    """3 MB in 64 KiB writes every 0.07 s (~0.9 MB/s over ~3.4 s): far above the floor,
    with gaps shorter than the grace; it must arrive intact."""
    gw = gateway_factory(limits_policy(min_data_rate_bytes_per_s=1000, data_rate_grace_s=2,
                                       data_block_timeout_s=30, data_timeout_s=60))
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"  # 74 bytes
    body = BODY + line * (3 * 1024 * 1024 // len(line))
    with RawSmtpClient(gw.address, timeout=30) as c:
        start_transaction(c)
        assert c.cmd("DATA").startswith("354 ")
        t0 = time.monotonic()
        step = 64 * 1024
        for off in range(0, len(body), step):
            c.send(body[off:off + step])
            time.sleep(0.07)
        c.send(b".\r\n")
        final = c.reply_lines()[-1]
        took = time.monotonic() - t0
        assert final.startswith("250 2.0.0 Ok: queued as "), final
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert took >= 3.0, took  # it really was spread out (48 writes)
    qid = final.rsplit(" ", 1)[1]
    assert gw.message_event(qid)["action"] != "too-slow"
    [delivered] = gw.maildir_messages()
    assert delivered.endswith(body)  # our headers on top, the message itself unchanged
    assert connection_events(gw, 1)[0]["end"] == "quit"
