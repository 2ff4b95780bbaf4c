"""Delivery to the downstream: connections reused between messages (both modes: between
deliveries in queue mode, between client sessions in proxy mode), closed once idle, limited per
destination (queue mode), failover across several downstream hosts (both modes)."""

from __future__ import annotations

import email
import signal
import smtplib
import socket
import threading
import time

import pytest

from tests.support.gateway import base_policy
from tests.support.sink import Sink


def _send(gw, n: int, start: int = 0) -> None:
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        for i in range(start, start + n):
            s.sendmail("a@sender.test", ["alice@example.test"],
                       f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())


def test_connections_are_reused_between_messages(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": "queue"},
                                         queue={"scan_interval_s": 0.2,
                                                "connection_reuse_s": 5}))
        for i in range(10):  # one at a time: each is delivered before the next arrives
            _send(gw, 1, i)
            sink.wait_for(i + 1, 10)
        assert len(sink.messages) == 10
        assert sink.connections == 1, f"{sink.connections} downstream connections for 10 messages"
        # the next MAIL right after the end of data (no RSET needed), never a second EHLO
        assert sum(1 for c in sink.commands if c.upper().startswith("EHLO")) == 1


def test_no_reuse_when_turned_off(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": "queue"},
                                         queue={"scan_interval_s": 0.2,
                                                "connection_reuse_s": 0}))
        for i in range(3):
            _send(gw, 1, i)
            sink.wait_for(i + 1, 10)
        assert sink.connections == 3


def _session(gw, i: int, date: bool = True) -> tuple[int, bytes]:
    """One client session with one message (``date``: with a Date: header); the reply to
    its data."""
    head = "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n" if date else ""
    with smtplib.SMTP(*gw.address, timeout=20) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("alice@example.test")
        return s.data(f"{head}Subject: m{i}\r\n\r\nbody {i}\r\n".encode())


def _proxy(sink: Sink, reuse_s: float, **sections):
    return base_policy(f"smtp://127.0.0.1:{sink.port}",
                       relay={"mode": "proxy", "connection_reuse_s": reuse_s}, **sections)


def _subjects(sink: Sink) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in sink.messages]


def test_proxy_mode_reuses_connections_between_client_sessions(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(_proxy(sink, 5))
        for i in range(5):  # five clients one after another, each in lockstep with the sink
            code, text = _session(gw, i)
            assert code == 250, text
        assert _subjects(sink) == [f"m{i}" for i in range(5)]
        assert sink.connections == 1, f"{sink.connections} downstream connections for 5 clients"
        assert sum(1 for c in sink.commands if c.upper().startswith("EHLO")) == 1
        assert "QUIT" not in sink.commands


def test_proxy_mode_resets_a_refused_transaction_and_reuses_the_connection(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(_proxy(sink, 5, scores={"HEADERS_MISSING_DATE": 1.0},
                                    actions={"reject": 0.1}))
        code, _ = _session(gw, 0, date=False)  # refused by the policy after the downstream RCPT
        assert code == 550
        code, text = _session(gw, 1)
        assert code == 250, text
        assert _subjects(sink) == ["m1"] and sink.connections == 1
        cmds = [c.split(":")[0] for c in sink.commands]
        assert cmds == ["EHLO mx.gateway.test", "MAIL FROM", "RCPT TO", "RSET",
                        "MAIL FROM", "RCPT TO", "DATA"], sink.commands


def test_proxy_mode_no_reuse_when_turned_off(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(_proxy(sink, 0))
        for i in range(3):
            assert _session(gw, i)[0] == 250
        assert sink.connections == 3
        deadline = time.monotonic() + 5  # each QUIT is sent after the client's 250
        while sink.commands.count("QUIT") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.commands.count("QUIT") == 3


def test_proxy_mode_replaces_a_reused_connection_the_downstream_closes_at_mail(gateway_factory):
    """A server that takes one message per connection answers the next MAIL with 421 and
    hangs up: the client still gets 250, through a new connection, never a 451."""
    with Sink(messages_per_connection=1) as sink:
        gw = gateway_factory(_proxy(sink, 5))
        for i in range(3):
            code, text = _session(gw, i)
            assert code == 250, text
        assert _subjects(sink) == ["m0", "m1", "m2"] and sink.connections == 3
        assert sum(1 for c in sink.commands if c.startswith("MAIL")) == 5  # 2 met a 421


def test_proxy_mode_reload_closes_the_old_policys_idle_connections(gateway_factory):
    """A reload brings new relay settings: the connections kept under the old ones are
    closed (QUIT), and the next client's transaction opens one under the new."""
    with Sink() as sink:
        gw = gateway_factory(_proxy(sink, 30))
        assert _session(gw, 0)[0] == 250
        assert sink.open_connections == 1  # kept for the next client
        before = len(gw.events("reloaded"))
        gw.write_policy(_proxy(sink, 20))
        gw.signal(signal.SIGHUP)
        gw.wait_for(lambda e: e.get("event") == "reloaded"
                    and len(gw.events("reloaded")) > before)
        deadline = time.monotonic() + 5
        while sink.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.open_connections == 0 and sink.commands[-1] == "QUIT"
        assert _session(gw, 1)[0] == 250
        assert _subjects(sink) == ["m0", "m1"] and sink.connections == 2


def test_proxy_mode_shutdown_says_quit_on_idle_connections(gateway_factory):
    with Sink() as sink:
        gw = gateway_factory(_proxy(sink, 30))
        assert _session(gw, 0)[0] == 250
        assert sink.open_connections == 1
        assert gw.stop() == 0
        deadline = time.monotonic() + 5
        while sink.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.commands[-1] == "QUIT" and sink.open_connections == 0


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_idle_downstream_connections_are_closed_after_connection_reuse_s(gateway_factory,
                                                                          mode):
    with Sink() as sink:
        gw = gateway_factory(base_policy(
            f"smtp://127.0.0.1:{sink.port}",
            relay={"mode": mode, "connection_reuse_s": 0.3},
            queue={"scan_interval_s": 0.2, "connection_reuse_s": 0.3}))
        assert _session(gw, 0)[0] == 250
        sink.wait_for(1, 10)
        assert sink.open_connections == 1  # kept for the next message
        deadline = time.monotonic() + 5
        while sink.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sink.open_connections == 0 and sink.commands[-1] == "QUIT"


def test_per_destination_concurrency_is_capped(gateway_factory):
    with Sink(delay_s=0.3, delay_on={"DATA_END"}) as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": "queue"},
                                         queue={"scan_interval_s": 0.2, "max_per_destination": 2,
                                                "connection_reuse_s": 0}))
        threads = [threading.Thread(target=_send, args=(gw, 2, 10 * k)) for k in range(4)]
        for t in threads:
            t.start()
        peak, deadline = 0, time.monotonic() + 20
        while len(sink.messages) < 8 and time.monotonic() < deadline:
            peak = max(peak, sink.open_connections)
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert len(sink.messages) == 8
        assert 1 <= peak <= 2, f"{peak} connections at once to one destination"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["proxy", "queue"])
def test_failover_to_the_next_downstream_host(gateway_factory, mode):
    dead = _free_port()  # nothing listens there
    with Sink(greeting="421 4.3.2 busy") as busy, Sink() as good:
        route = f"smtp://127.0.0.1:{dead},127.0.0.1:{busy.port},127.0.0.1:{good.port}"
        gw = gateway_factory(base_policy(route, relay={"mode": mode},
                                         queue={"scan_interval_s": 0.2}))
        _send(gw, 2)
        msgs = good.wait_for(2, 10)
        assert len(msgs) == 2 and busy.messages == []
        assert busy.connections >= 1  # it was tried, and refused at the greeting


def test_delay_warning_is_sent_once(gateway_factory):
    with Sink(replies={"RCPT:alice@example.test": "451 4.2.0 mailbox busy"}) as sink:
        pol = base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": "queue"},
                          queue={"scan_interval_s": 0.1, "min_backoff_s": 0.2,
                                 "max_backoff_s": 0.3, "delay_warning_s": 0.5})
        pol["domains"]["accepted"] = ["example.test", "sender.test"]
        pol["filters"][0]["recipients"] = ["@example.test", "@sender.test"]
        gw = gateway_factory(pol)
        with smtplib.SMTP(*gw.address, timeout=20) as s:
            s.ehlo("c.test")
            s.mail("a@sender.test")
            s.rcpt("alice@example.test", ["NOTIFY=DELAY,FAILURE"])
            code, _ = s.data(b"Subject: slow\r\n\r\nbody\r\n")
        assert code == 250
        [warning] = sink.wait_for(1, 10)
        time.sleep(1.5)  # more retries happen; no second warning
        assert len(sink.messages) == 1
    assert warning.mail_from == "" and warning.rcpts == ("a@sender.test",)
    msg = email.message_from_bytes(warning.data)
    assert msg.get_content_type() == "multipart/report"
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
    fields = status.get_payload()[1]  # the per-recipient block
    assert fields["Action"] == "delayed"
    assert fields["Status"] == "4.2.0"
    assert fields["Remote-MTA"] == "dns; [127.0.0.1]"  # the server whose 451 it quotes
    assert fields["Final-Recipient"].replace(" ", "") == "rfc822;alice@example.test"
    assert fields["Will-Retry-Until"]
    assert len(gw.events("dsn")) == 1 and gw.events("dsn")[0]["action"] == "delayed"


def test_a_503_out_of_step_reply_defers_and_never_bounces(gateway_factory):
    """A downstream answering 503 (bad sequence) to MAIL says the session is out of step, not
    that the message is bad: the queue drops that connection and retries; no DSN is sent."""
    with Sink(replies={"MAIL:a@sender.test": "503 5.5.1 Error: nested MAIL command"}) as sink:
        gw = gateway_factory(base_policy(f"smtp://127.0.0.1:{sink.port}", relay={"mode": "queue"},
                                         queue={"scan_interval_s": 0.2, "min_backoff_s": 0.2,
                                                "max_backoff_s": 0.3}))
        _send(gw, 1)
        first = gw.wait_for(lambda e: e.get("event") == "delivery")
        assert first["outcome"] != "done" and "503" in str(first), first
        time.sleep(1.0)  # several retries, each on a new connection
        assert sink.messages == [] and gw.events("dsn") == []
        assert sink.connections >= 2
        assert all(e["outcome"] != "bounced" for e in gw.events("delivery"))
