"""Hostile MIME structure through the real gateway on the shipped default policy
(policies/default.toml, queue mode, DNS from a loopback server): a message of 2000 nested
multiparts gets a final ``554 5.6.0`` naming MIME_TOO_DEEP (it used to get the attachments
filter's ``451 4.3.0`` after a RecursionError in the rules, Bayes and attachments filters, so
the sender retried it for days), the log line names the finding, nothing is delivered; a
message at the depth bound is delivered as usual."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.mimebounds import nested
from tests.support.dnsserver import DnsServer
from tests.support.gateway import REPO, GatewayProcess

SENDER = "bob@sender.test"
RCPT = "alice@example.test"
QID = re.compile(r"\(([0-9A-Z]{16})\)$|queued as ([0-9A-Z]{16})$")


def message(levels: int, subject: str) -> bytes:
    head = (f"To: {RCPT}\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{levels}.{subject.replace(' ', '.')}@sender.test>\r\n").encode()
    return head + nested(levels, b"Content-Type: text/plain\r\n\r\nthe bottom line\r\n") \
        .replace(b"From: a@example.test", f"From: {SENDER}".encode())


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    text = (REPO / "policies" / "default.toml").read_text()
    zone = 'sender.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    with DnsServer(zone) as ns:
        text = text.replace('"127.0.0.1:2525"', '"127.0.0.1:0"').replace(
            "nameservers = []", f'nameservers = ["127.0.0.1:{ns.port}"]')
        work = tmp_path_factory.mktemp("gw")
        proc = GatewayProcess(work, text, name="policies/default.toml")
        with proc:  # (``with proc.start()`` started it twice: the first one was left running)
            yield proc


def send(gw: GatewayProcess, data: bytes) -> tuple[int, str, str]:
    with smtplib.SMTP(*gw.address, timeout=60) as s:
        s.ehlo("client.test")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(RCPT)[0] == 250
        code, text = s.data(data)
    reply = text.decode()
    m = QID.search(reply)
    assert m, reply
    return code, reply, m[1] or m[2]


def delivered(workdir: Path) -> list[bytes]:
    new = workdir / "Maildir" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def test_2000_nested_multiparts_get_a_final_554_5_6_0_and_are_not_delivered(
        gw: GatewayProcess) -> None:
    code, reply, qid = send(gw, message(2000, "deep"))
    assert code == 554 and reply.startswith("5.6.0 "), (code, reply)
    assert "MIME_TOO_DEEP" in reply and "more than 50 levels" in reply
    ev = gw.message_event(qid)
    assert ev["action"] == "reject" and ev["by"] == "filter:mime", ev
    assert "MIME_TOO_DEEP(10)[more than 50 levels]" in ev["symbols"], ev["symbols"]
    assert not ev.get("filter_errors"), ev  # no filter failed: rules, bayes, attachments ran
    assert not any(b"Subject: deep" in m for m in delivered(gw.workdir))


def test_a_message_at_the_depth_bound_is_delivered(gw: GatewayProcess) -> None:
    code, reply, qid = send(gw, message(50, "at the bound"))
    assert code == 250, reply
    done = gw.wait_for(lambda e: e.get("event") == "delivery" and e.get("qid") == qid,
                       timeout_s=20)
    assert done["outcome"] == "done"
    ev = gw.message_event(qid)
    assert ev["action"] == "accept" and not any(s.startswith("MIME_") for s in ev["symbols"])
    assert not ev.get("filter_errors"), ev
    [msg] = [m for m in delivered(gw.workdir) if b"Subject: at the bound" in m]
    assert b"the bottom line" in msg


def test_a_from_with_3000_nested_comments_gets_a_final_answer(gw: GatewayProcess) -> None:
    """The stdlib's address parser recurses per comment level: the headers, DMARC, rules and
    Bayes filters failed (RecursionError) and DMARC's on_error = tempfail answered 451."""
    comments = "\r\n ".join(["(" * 500] * 6 + [")" * 500] * 6)  # folded: lines under 1000
    data = (f"From: {comments} {SENDER}\r\nTo: {RCPT}\r\nSubject: comments\r\n"
            "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <c@sender.test>\r\n\r\n"
            "hello\r\n").encode()
    code, reply, qid = send(gw, data)
    ev = gw.message_event(qid)
    assert not ev.get("filter_errors"), ev  # the old code: headers, dmarc, bayes failed
    assert code == 250, (code, reply)  # scored as a From nobody can read, not retried
    names = {s.partition("(")[0] for s in ev["symbols"]}
    assert {"HEADERS_BAD_FROM", "DMARC_NO_FROM"} <= names, ev["symbols"]


def _head(subject: str) -> str:
    return (f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{len(subject)}@sender.test>\r\n")


def many_parts() -> bytes:
    parts = "--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 1500
    return (_head("many parts") + 'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; '
            f'boundary="b"\r\n\r\n{parts}--b--\r\n').encode()


def many_headers() -> bytes:
    extra = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(1001))
    return (_head("many headers") + extra + "\r\nhello\r\n").encode()


def many_words() -> bytes:
    words = "\r\n ".join(["=?utf-8?q?w=C3=B6rd?="] * 1001)
    return (_head(words) + "\r\nhello\r\n").encode()


@pytest.mark.parametrize("build, symbol, what", [
    (many_parts, "MIME_TOO_MANY_PARTS", "MIME parts more than 1000 parts"),
    (many_headers, "MIME_TOO_MANY_HEADERS", "header fields more than 1000 in a header block"),
    (many_words, "MIME_TOO_MANY_ENCODED_WORDS", "encoded words more than 1000"),
])
def test_every_structural_bound_is_a_final_554_5_6_0(gw: GatewayProcess, build, symbol,  # type: ignore[no-untyped-def]
                                                     what) -> None:
    code, reply, qid = send(gw, build())  # the old code relayed each of them
    assert code == 554 and reply.startswith(f"5.6.0 Message structure refused: {what} "
                                            f"({symbol})"), (code, reply)
    ev = gw.message_event(qid)
    assert ev["action"] == "reject" and ev["by"] == "filter:mime", ev
    assert any(s.startswith(symbol) for s in ev["symbols"]) and not ev.get("filter_errors")



def _two_ways(top: str) -> bytes:
    exe = "TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACAAAAA"
    return (_head(top[:20]) + f"MIME-Version: 1.0\r\n{top}\r\n\r\n--B\r\n"
            "Content-Type: text/plain\r\n\r\nhi\r\n--B\r\nContent-Type: application/"
            "octet-stream; name=x.dat\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            f"{exe}\r\n--B--\r\n").encode()


@pytest.mark.parametrize("top, detail", [
    ("Content-Type: multipart/mixed; boundary=A; boundary=B", "2 different boundaries"),
    ("Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=B",
     "2 different Content-Type headers"),
])
def test_a_structure_read_two_ways_is_a_final_554_5_6_0(gw: GatewayProcess, top: str,
                                                        detail: str) -> None:
    """The stdlib reads the first boundary or Content-Type, a client may take the last and
    show the attachment the checks never saw (old code: relayed, 250)."""
    code, reply, qid = send(gw, _two_ways(top))
    assert code == 554 and reply.startswith("5.6.0 Message structure refused: MIME structure "
                                            f"read two ways: {detail} (MIME_AMBIGUOUS)"), reply
