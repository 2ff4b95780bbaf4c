"""Tests for gateway.dsn: when a DSN is wanted (RFC 3461) and the message built (RFC 3464).

Every built DSN is parsed back with the stdlib ``email`` package and checked field by field.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any, cast

import pytest

from gateway.dsn import (
    DsnError,
    DsnRequest,
    RecipientStatus,
    build_dsn,
    parse_notify,
    wants_dsn,
)
from gateway.errors import MailgateError
from gateway.replies import Reply
from gateway.smtp.address import xtext_decode, xtext_encode
from gateway.smtp.dsnparams import check_orcpt, encode_orcpt

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = 1_700_000_200.0  # Tue, 14 Nov 2023 22:16:40 +0000
QID = "0ABC123DEF456GHJ"
HEADER = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <m1@example.org>\r\n"
)
BODY = b"Hello Bob,\r\nthe body line.\r\n"
ORIGINAL = HEADER + b"\r\n" + BODY
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
NOTIFY_CASES = {
    None: {"failed"},
    frozenset({"NEVER"}): set(),
    frozenset({"SUCCESS"}): {"delivered", "relayed", "expanded"},
    frozenset({"FAILURE"}): {"failed"},
    frozenset({"DELAY"}): {"delayed"},
    frozenset({"SUCCESS", "FAILURE"}): {"failed", "delivered", "relayed", "expanded"},
    frozenset({"FAILURE", "DELAY"}): {"failed", "delayed"},
    frozenset({"SUCCESS", "DELAY"}): {"delayed", "delivered", "relayed", "expanded"},
    frozenset({"SUCCESS", "FAILURE", "DELAY"}): set(ACTIONS),
}


def request(**kw: Any) -> DsnRequest:
    fields: dict[str, Any] = {
        "qid": QID,
        "sender": "alice@example.org",
        "arrival": ARRIVAL,
        "reporting_mta": "mx.example.net",
    }
    fields.update(kw)
    return DsnRequest(**fields)


def bounce(**kw: Any) -> RecipientStatus:
    fields: dict[str, Any] = {
        "recipient": "bob@example.com",
        "action": "failed",
        "status": "5.1.1",
        "remote_mta": "mx.example.com",
        "diagnostic": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
        "last_attempt": ARRIVAL + 100,
    }
    fields.update(kw)
    return RecipientStatus(**fields)


def parse(dsn: bytes) -> EmailMessage:
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(part, EmailMessage) for part in payload)
    return cast(list[EmailMessage], payload)


def blocks(msg: EmailMessage) -> list[dict[str, str]]:
    """The delivery-status part as one dict per block (per-message first)."""
    status = parts(msg)[1]
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(block, Message) for block in payload)
    return [{name: str(value) for name, value in cast(Message, b).items()} for b in payload]


def text_of(part: Message) -> str:
    content = part.get_content()  # type: ignore[attr-defined]
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def date(ts: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(ts, UTC))


def assert_wire_safe(dsn: bytes) -> None:
    """CRLF only, no line over 998 octets, ends with CRLF."""
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", dsn) is None, "bare CR or LF"
    assert dsn.endswith(b"\r\n")
    longest = max(len(line) for line in dsn.split(b"\r\n"))
    assert longest <= 998, longest


# --- wants_dsn / parse_notify ------------------------------------------------------------------


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("notify", list(NOTIFY_CASES), ids=str)
def test_wants_dsn_follows_notify(notify: frozenset[str] | None, action: str) -> None:
    expected = action in NOTIFY_CASES[notify]
    assert wants_dsn("alice@example.org", notify, action) is expected


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("notify", list(NOTIFY_CASES), ids=str)
@pytest.mark.parametrize("sender", ["", "<>"])
def test_no_dsn_ever_to_the_null_sender(
    sender: str, notify: frozenset[str] | None, action: str
) -> None:
    assert wants_dsn(sender, notify, action, delay_by_default=True) is False


def test_delay_warnings_without_notify_are_opt_in() -> None:
    assert wants_dsn("a@example.org", None, "delayed") is False
    assert wants_dsn("a@example.org", None, "delayed", delay_by_default=True) is True
    # An explicit NOTIFY wins over the default.
    failure = frozenset({"FAILURE"})
    assert wants_dsn("a@example.org", failure, "delayed", delay_by_default=True) is False
    never = frozenset({"NEVER"})
    assert wants_dsn("a@example.org", never, "delayed", delay_by_default=True) is False
    assert wants_dsn("a@example.org", None, "delivered", delay_by_default=True) is False


def test_wants_dsn_accepts_lower_case_keywords() -> None:
    assert wants_dsn("a@example.org", frozenset({"failure"}), "failed") is True
    assert wants_dsn("a@example.org", frozenset({"never"}), "failed") is False


@pytest.mark.parametrize(
    "notify",
    [frozenset({"NEVER", "SUCCESS"}), frozenset({"BOGUS"}), frozenset(), frozenset({""})],
    ids=str,
)
def test_wants_dsn_refuses_invalid_notify(notify: frozenset[str]) -> None:
    with pytest.raises(DsnError):
        wants_dsn("a@example.org", notify, "failed")
    with pytest.raises(DsnError):  # checked even where the answer would be "no" anyway
        wants_dsn("", notify, "failed")


def test_wants_dsn_refuses_unknown_action() -> None:
    with pytest.raises(DsnError, match="bounced"):
        wants_dsn("a@example.org", None, "bounced")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NEVER", {"NEVER"}),
        ("never", {"NEVER"}),
        ("SUCCESS,FAILURE", {"SUCCESS", "FAILURE"}),
        ("Failure,Delay", {"FAILURE", "DELAY"}),
        ("DELAY,SUCCESS,FAILURE", {"SUCCESS", "FAILURE", "DELAY"}),
    ],
)
def test_parse_notify(value: str, expected: set[str]) -> None:
    assert parse_notify(value) == frozenset(expected)


@pytest.mark.parametrize(
    "value",
    # "\u017f" (LATIN SMALL LETTER LONG S) upper-cases to "S": no SUCCESS by the back door.
    ["", "NEVER,DELAY", "SUCCESS,NEVER", "FAILURE,", ",FAILURE", "SUCCESS FAILURE", "\u017fuccess"],
)
def test_parse_notify_refuses(value: str) -> None:
    with pytest.raises(DsnError):
        parse_notify(value)


def test_dsn_error_is_in_the_exception_tree() -> None:
    assert issubclass(DsnError, MailgateError)
    assert issubclass(DsnError, ValueError)


# --- the message: headers, structure, every field -----------------------------------------------


def test_failure_dsn_every_field() -> None:
    req = request(envid="QQ314159", ret="HDRS", received_from_mta="client.example.org")
    st = bounce(original_recipient="rfc822;Bob@Example.com")
    dsn = build_dsn(req, [st], ORIGINAL, now=NOW)
    assert_wire_safe(dsn)
    assert dsn.isascii()
    msg = parse(dsn)

    assert set(msg.keys()) == {
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Auto-Submitted",
        "Content-Type",
    }  # fmt: skip
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@example.org"]
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime == datetime.fromtimestamp(NOW, UTC)
    assert b"\r\nDate: Tue, 14 Nov 2023 22:16:40 +0000\r\n" in dsn
    assert re.fullmatch(rf"<[^<>@\s]+\.{QID}@mx\.example\.net>", msg["Message-ID"])
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg.defects == []

    human, status, returned = parts(msg)
    assert human.get_content_type() == "text/plain"
    text = text_of(human)
    for fragment in (
        "mx.example.net",
        f"Queue ID: {QID}",
        "Received: Tue, 14 Nov 2023 22:13:20 +0000 from client.example.org",
        "failed",
        "<bob@example.com>",
        "Status: 5.1.1 (bad destination mailbox address)",
        "Originally addressed to: Bob@Example.com",
        "Remote server: mx.example.com",
        "Reason: 550 5.1.1 <bob@example.com>: user unknown",
        f"Last attempt: {date(ARRIVAL + 100)}",
        "header is attached",
    ):
        assert fragment in text, fragment

    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = blocks(msg)
    assert per_message == {
        "Original-Envelope-Id": "QQ314159",
        "Reporting-MTA": "dns; mx.example.net",
        "Received-From-MTA": "dns; client.example.org",
        "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
        "X-Mailgate-Queue-ID": QID,
    }
    assert list(per_message) == [  # RFC 3464 2.2 order
        "Original-Envelope-Id", "Reporting-MTA", "Received-From-MTA", "Arrival-Date",
        "X-Mailgate-Queue-ID",
    ]  # fmt: skip
    assert per_recipient == {
        "Original-Recipient": "rfc822; Bob@Example.com",
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
        "Last-Attempt-Date": "Tue, 14 Nov 2023 22:15:00 +0000",
    }
    assert list(per_recipient) == [  # RFC 3464 2.3 order
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]  # fmt: skip

    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload() == HEADER.decode()
    assert b"the body line" not in dsn


def test_minimal_dsn_omits_optional_fields() -> None:
    st = RecipientStatus("bob@example.com", "failed", "5.0.0")
    msg = parse(build_dsn(request(), [st], ORIGINAL, now=NOW))
    assert blocks(msg) == [
        {
            "Reporting-MTA": "dns; mx.example.net",
            "Arrival-Date": "Tue, 14 Nov 2023 22:13:20 +0000",
            "X-Mailgate-Queue-ID": QID,
        },
        {"Final-Recipient": "rfc822; bob@example.com", "Action": "failed", "Status": "5.0.0"},
    ]
    text = text_of(parts(msg)[0])
    assert "Status: 5.0.0 (other status)" in text
    assert "Reason:" not in text and "Remote server:" not in text


def test_bare_diagnostic_and_host_get_default_types() -> None:
    st = bounce(status="5.7.1", remote_mta="[192.0.2.7]", diagnostic="550 5.7.1 relaying denied")
    req = request(received_from_mta="dns; client.example.org ([192.0.2.1])")
    msg = parse(build_dsn(req, [st], ORIGINAL, now=NOW))
    per_message, per_recipient = blocks(msg)
    assert per_message["Received-From-MTA"] == "dns; client.example.org ([192.0.2.1])"
    assert per_recipient["Remote-MTA"] == "dns; [192.0.2.7]"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.7.1 relaying denied"
    assert "delivery not authorized, message refused" in text_of(parts(msg)[0])


def test_default_date_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    msg = parse(build_dsn(request(), [bounce()], ORIGINAL))
    after = datetime.now(UTC)
    assert before <= msg["Date"].datetime <= after


def test_postmaster_address_can_be_chosen() -> None:
    dsn = build_dsn(request(), [bounce()], ORIGINAL, now=NOW, postmaster="postmaster@example.net")
    assert str(parse(dsn)["From"]) == "Mail Delivery System <postmaster@example.net>"


def test_each_dsn_has_its_own_message_id_and_boundary() -> None:
    first = parse(build_dsn(request(), [bounce()], ORIGINAL, now=NOW))
    second = parse(build_dsn(request(), [bounce()], ORIGINAL, now=NOW))
    assert first["Message-ID"] != second["Message-ID"]
    assert first.get_boundary() != second.get_boundary()


# --- multiple recipients, subjects --------------------------------------------------------------


def test_mixed_actions_one_block_each() -> None:
    statuses = [
        bounce(),
        RecipientStatus(
            "carol@example.com",
            "delayed",
            "4.4.1",
            remote_mta="dns; mx2.example.com",
            diagnostic="smtp; 421 4.4.1 try again later",
            last_attempt=ARRIVAL + 60,
            will_retry_until=ARRIVAL + 5 * 86400,
        ),
        RecipientStatus("dave@example.com", "delivered", "2.0.0", remote_mta="mx3.example.com"),
        RecipientStatus("erin@example.com", "relayed", "2.0.0"),
        RecipientStatus("list@example.com", "expanded", "2.0.0"),
        RecipientStatus("frank@example.com", "failed", "4.4.7", diagnostic="delivery expired"),
    ]
    msg = parse(build_dsn(request(), statuses, ORIGINAL, now=NOW))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, *recipients = blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.example.net"
    assert recipients == [
        {
            "Final-Recipient": "rfc822; bob@example.com",
            "Action": "failed",
            "Status": "5.1.1",
            "Remote-MTA": "dns; mx.example.com",
            "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
            "Last-Attempt-Date": date(ARRIVAL + 100),
        },
        {
            "Final-Recipient": "rfc822; carol@example.com",
            "Action": "delayed",
            "Status": "4.4.1",
            "Remote-MTA": "dns; mx2.example.com",
            "Diagnostic-Code": "smtp; 421 4.4.1 try again later",
            "Last-Attempt-Date": date(ARRIVAL + 60),
            "Will-Retry-Until": "Sun, 19 Nov 2023 22:13:20 +0000",
        },
        {
            "Final-Recipient": "rfc822; dave@example.com",
            "Action": "delivered",
            "Status": "2.0.0",
            "Remote-MTA": "dns; mx3.example.com",
        },
        {"Final-Recipient": "rfc822; erin@example.com", "Action": "relayed", "Status": "2.0.0"},
        {"Final-Recipient": "rfc822; list@example.com", "Action": "expanded", "Status": "2.0.0"},
        {
            "Final-Recipient": "rfc822; frank@example.com",
            "Action": "failed",
            "Status": "4.4.7",
            "Diagnostic-Code": "smtp; delivery expired",
        },
    ]
    text = text_of(parts(msg)[0])
    sections = [
        "Delivery to these recipients failed",
        "<bob@example.com>",
        "<frank@example.com>",
        "Status: 4.4.7 (delivery time expired)",
        "Delivery to these recipients is delayed",
        "<carol@example.com>",
        "Will retry until: Sun, 19 Nov 2023 22:13:20 +0000",
        "delivered to these recipients:",
        "<dave@example.com>",
        "relayed to these recipients",
        "<erin@example.com>",
        "forwarded on from there",
        "<list@example.com>",
    ]
    positions = [text.find(s) for s in sections]
    assert -1 not in positions, list(zip(sections, positions, strict=True))
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    ("actions", "subject"),
    [
        (("failed",), "Undelivered Mail Returned to Sender"),
        (("delivered", "failed"), "Undelivered Mail Returned to Sender"),
        (("delayed",), "Delayed Mail (still being retried)"),
        (("delivered", "delayed"), "Delayed Mail (still being retried)"),
        (("delivered",), "Successful Mail Delivery Report"),
        (("relayed", "expanded"), "Successful Mail Delivery Report"),
    ],
)
def test_subject_by_action(actions: tuple[str, ...], subject: str) -> None:
    status = {"failed": "5.0.0", "delayed": "4.0.0"}
    statuses = [
        RecipientStatus(f"r{i}@example.com", a, status.get(a, "2.0.0"))  # type: ignore[arg-type]
        for i, a in enumerate(actions)
    ]
    msg = parse(build_dsn(request(), statuses, ORIGINAL, now=NOW))
    assert msg["Subject"] == subject


# --- the returned original (RET) ----------------------------------------------------------------


def test_ret_full_returns_the_whole_message() -> None:
    dsn = build_dsn(request(ret="FULL"), [bounce()], ORIGINAL, now=NOW)
    assert_wire_safe(dsn)
    assert ORIGINAL in dsn  # byte for byte
    returned = parts(parse(dsn))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "7bit"
    inner = returned.get_content()
    assert inner["Subject"] == "quarterly report"
    assert inner["Message-ID"] == "<m1@example.org>"
    assert inner.get_content().replace("\r\n", "\n") == "Hello Bob,\nthe body line.\n"
    assert "The message is attached." in text_of(parts(parse(dsn))[0])


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_without_ret_full_only_the_header_returns(ret: str | None) -> None:
    dsn = build_dsn(request(ret=ret), [bounce()], ORIGINAL, now=NOW)
    returned = parts(parse(dsn))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload() == HEADER.decode()
    assert returned["Content-Transfer-Encoding"] == "7bit"
    assert b"the body line" not in dsn


@pytest.mark.parametrize(("action", "status"), [("delayed", "4.4.1"), ("delivered", "2.0.0")])
def test_ret_full_returns_only_the_header_when_nothing_failed(action: str, status: str) -> None:
    st = RecipientStatus("bob@example.com", action, status)  # type: ignore[arg-type]
    dsn = build_dsn(request(ret="FULL"), [st], ORIGINAL, now=NOW)
    assert parts(parse(dsn))[2].get_content_type() == "text/rfc822-headers"
    assert b"the body line" not in dsn


def test_original_line_endings_are_normalized() -> None:
    lf = ORIGINAL.replace(b"\r\n", b"\n")
    dsn = build_dsn(request(ret="FULL"), [bounce()], io.BytesIO(lf), now=NOW)
    assert_wire_safe(dsn)
    assert ORIGINAL in dsn


@pytest.mark.parametrize("as_stream", [False, True])
def test_large_original_is_cut_to_its_header(as_stream: bool) -> None:
    big = ORIGINAL + b"filler line\r\n" * 20_000  # about 260 kB
    limit = 10_000
    source: io.BytesIO | bytes = io.BytesIO(big) if as_stream else big
    dsn = build_dsn(request(ret="FULL"), [bounce()], source, now=NOW, max_original_bytes=limit)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload() == HEADER.decode()
    assert b"filler line" not in dsn and b"the body line" not in dsn
    text = " ".join(text_of(parts(msg)[0]).split())
    assert "larger than 10000 bytes, so only its header is returned" in text
    if isinstance(source, io.BytesIO):
        assert source.tell() <= limit + 1


def test_size_limit_is_inclusive() -> None:
    exact = len(ORIGINAL)
    at_limit = build_dsn(request(ret="FULL"), [bounce()], ORIGINAL, max_original_bytes=exact)
    over = build_dsn(request(ret="FULL"), [bounce()], ORIGINAL, max_original_bytes=exact - 1)
    assert parts(parse(at_limit))[2].get_content_type() == "message/rfc822"
    assert parts(parse(over))[2].get_content_type() == "text/rfc822-headers"


def test_headers_only_reads_no_further_than_the_header() -> None:
    stream = io.BytesIO(ORIGINAL + b"x" * 1_000_000)
    dsn = build_dsn(request(ret="HDRS"), [bounce()], stream, now=NOW)
    assert parts(parse(dsn))[2].get_payload() == HEADER.decode()
    assert stream.tell() <= 65536


class Trickle(io.BytesIO):
    """A stream that hands out one octet per read, as a pipe may."""

    def read(self, size: int | None = -1) -> bytes:
        return super().read(1 if size is None or size < 0 else min(size, 1))


@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
def test_header_end_is_found_across_tiny_reads(newline: bytes) -> None:
    stream = Trickle(ORIGINAL.replace(b"\r\n", newline) + b"x" * 10_000)
    dsn = build_dsn(request(ret="HDRS"), [bounce()], stream, now=NOW)
    assert parts(parse(dsn))[2].get_payload() == HEADER.decode()
    # Read no further than the blank line (its CR may already count as the line break).
    assert stream.tell() <= len(HEADER.replace(b"\r\n", newline)) + len(newline)


def test_overlong_header_block_is_cut_at_a_line() -> None:
    header = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"v" * 80) for i in range(100))
    dsn = build_dsn(request(), [bounce()], header + b"\r\nbody\r\n", max_original_bytes=1000)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    payload = parts(msg)[2].get_payload()
    assert isinstance(payload, str)
    assert 0 < len(payload) <= 1000
    assert header.decode().startswith(payload)  # whole lines only
    assert "header was cut short" in " ".join(text_of(parts(msg)[0]).split())


def test_overlong_header_line_is_cut_to_998_octets() -> None:
    original = b"X-Long: " + b"z" * 2000 + b"\r\n" + HEADER + b"\r\n" + BODY
    dsn = build_dsn(request(ret="HDRS"), [bounce()], original, now=NOW)
    assert_wire_safe(dsn)
    payload = parts(parse(dsn))[2].get_payload()
    assert payload == (b"X-Long: " + b"z" * 990 + b"\r\n" + HEADER).decode()


def test_body_line_over_998_octets_returns_the_header_only() -> None:
    original = HEADER + b"\r\n" + b"y" * 2000 + b"\r\n"
    dsn = build_dsn(request(ret="FULL"), [bounce()], original, now=NOW)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "lines over 998 characters" in " ".join(text_of(parts(msg)[0]).split())


def test_empty_original_has_no_third_part() -> None:
    msg = parse(build_dsn(request(ret="FULL"), [bounce()], b"", now=NOW))
    assert [p.get_content_type() for p in parts(msg)] == ["text/plain", "message/delivery-status"]
    assert "original message is not available" in text_of(parts(msg)[0])


def test_8bit_original_is_kept_and_declared() -> None:
    utf8_header = "Subject: caf\u00e9\r\nFrom: j\u00f6rg@example.org\r\n".encode()
    dsn = build_dsn(request(ret="FULL"), [bounce()], utf8_header + b"\r\n\xff body\r\n")
    assert_wire_safe(dsn)
    assert not dsn.isascii()
    assert utf8_header + b"\r\n\xff body\r\n" in dsn
    returned = parts(parse(dsn))[2]
    assert returned["Content-Transfer-Encoding"] == "8bit"

    dsn = build_dsn(request(ret="HDRS"), [bounce()], utf8_header + b"\r\nbody\r\n")
    returned = parts(parse(dsn))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_content_charset() == "utf-8"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert returned.get_content().replace("\r\n", "\n") == utf8_header.decode().replace("\r", "")


# --- ENVID, ORCPT, non-ASCII addresses ----------------------------------------------------------


def test_envid_xtext_round_trip() -> None:
    wire = "QQ+2B314159+3Dx"  # ENVID as the client sent it
    decoded = xtext_decode(wire)
    assert decoded == "QQ+314159=x"
    msg = parse(build_dsn(request(envid=decoded), [bounce()], ORIGINAL, now=NOW))
    field = blocks(msg)[0]["Original-Envelope-Id"]
    assert field == decoded  # RFC 3461 6.3 (a): the ENVID, decoded
    assert xtext_encode(field) == wire


def test_non_ascii_envid_is_written_as_xtext() -> None:
    wire = "caf+C3+A9+20id"
    msg = parse(build_dsn(request(envid=xtext_decode(wire)), [bounce()], ORIGINAL, now=NOW))
    field = blocks(msg)[0]["Original-Envelope-Id"]
    assert field == wire
    assert xtext_decode(field) == "caf\u00e9 id"


def test_non_ascii_recipients_use_the_utf8_address_type() -> None:
    st = bounce(
        recipient="d\u00e4vid@ex\u00e4mple.com",
        original_recipient="rfc822;D\u00e4vid+tag=1@ex\u00e4mple.com",
    )
    dsn = build_dsn(request(), [st], ORIGINAL, now=NOW)
    status_part = dsn[dsn.index(b"message/delivery-status") :]
    assert status_part.split(b"\r\n--")[0].isascii()
    per_recipient = blocks(parse(dsn))[1]
    assert per_recipient["Final-Recipient"] == "utf-8; d\\x{E4}vid@ex\\x{E4}mple.com"
    assert per_recipient["Original-Recipient"] == (
        "utf-8; D\\x{E4}vid\\x{2B}tag\\x{3D}1@ex\\x{E4}mple.com"
    )
    assert "<d\u00e4vid@ex\u00e4mple.com>" in text_of(parts(parse(dsn))[0])


@pytest.mark.parametrize("wire, field", [
    # RFC 6533 utf-8-addr-unitext (in an SMTPUTF8 transaction) and utf-8-addr-xtext
    ("utf-8;pel\u00e9@example.com", "utf-8; pel\\x{E9}@example.com"),
    ("utf-8;pel\\x{E9}@example.com", "utf-8; pel\\x{E9}@example.com"),
    # ASCII in the utf-8 type: "+" and "=" are no QCHAR, written \x{2B} and \x{3D}
    ("utf-8;a\\x{2B}b\\x{3D}c@example.com", "utf-8; a\\x{2B}b\\x{3D}c@example.com"),
    ("utf-8;a+2Bb@example.com", "utf-8; a\\x{2B}b@example.com"),  # xtext, taken leniently
])
def test_utf8_orcpt_is_taken_in_either_rfc6533_form(wire: str, field: str) -> None:
    decoded = check_orcpt(wire)
    assert isinstance(decoded, str), decoded
    per_recipient = blocks(parse(build_dsn(
        request(), [bounce(original_recipient=decoded)], ORIGINAL, now=NOW)))[1]
    assert per_recipient["Original-Recipient"] == field
    # passed on to a downstream that offers DSN in the form valid with or without SMTPUTF8
    assert encode_orcpt(decoded) == "ORCPT=" + field.replace(" ", "")


@pytest.mark.parametrize("wire", ["utf-8;a+b@example.com", "utf-8;a=b@example.com",
                                  "utf-8;a\\b@example.com", "utf-8;a\\x{D800}@example.com",
                                  "utf-8;a\\x{110000}@example.com", "utf-8;a\\x{0A}@example.com"])
def test_bad_utf8_orcpt_is_refused(wire: str) -> None:
    assert check_orcpt(wire) == Reply(501, "5.5.4", "Bad ORCPT parameter")


def test_non_ascii_sender_gets_a_utf8_header() -> None:
    dsn = build_dsn(request(sender="j\u00f6rg@example.org"), [bounce()], ORIGINAL, now=NOW)
    assert_wire_safe(dsn)
    assert "\r\nTo: j\u00f6rg@example.org\r\n".encode() in dsn
    # The stdlib parser keeps undecoded octets as surrogates: undo that to compare.
    (to,) = parse(dsn)["To"].addresses
    assert to.addr_spec.encode("ascii", "surrogateescape").decode() == "j\u00f6rg@example.org"


def test_quoted_local_part_sender() -> None:
    msg = parse(build_dsn(request(sender='"john doe"@example.org'), [bounce()], ORIGINAL))
    assert msg["To"].addresses[0].username == "john doe"
    assert msg["To"].addresses[0].domain == "example.org"


# --- hostile input ------------------------------------------------------------------------------

HOSTILE = "550 5.1.1 nope\r\nBcc: victim@example.com\r\n\r\n--x\nTo: y@example.com\rCc: z"


def test_hostile_peer_text_cannot_inject_headers() -> None:
    st = bounce(
        remote_mta="mx.example.com\r\nBcc: a@example.com",
        diagnostic=HOSTILE + "\u2028Bcc: u\x85Bcc: n\x0bBcc: v =?utf-8?q?=0D=0ABcc:_w?= \u00e9",
    )
    req = request(received_from_mta="evil.example\nBcc: c@example.com")
    dsn = build_dsn(req, [st], ORIGINAL, now=NOW)
    assert_wire_safe(dsn)
    assert dsn.isascii()
    assert re.search(rb"(?im)^(bcc|cc|to: y)", dsn) is None
    msg = parse(dsn)
    assert msg["Bcc"] is None and msg["Cc"] is None
    assert len(parts(msg)) == 3
    per_message, per_recipient = blocks(msg)
    assert set(per_recipient) == {
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date",
    }  # fmt: skip
    assert per_message["Received-From-MTA"] == "dns; evil.example Bcc: c@example.com"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.com Bcc: a@example.com"
    diagnostic = per_recipient["Diagnostic-Code"]
    assert diagnostic.startswith(
        "smtp; 550 5.1.1 nope Bcc: victim@example.com --x To: y@example.com Cc: z"
    )
    assert "\r" not in diagnostic and "\n" not in diagnostic  # also not via an encoded-word
    assert diagnostic.endswith("?")  # non-ASCII replaced
    text = text_of(parts(msg)[0])
    assert not re.search(r"(?im)^(bcc|cc|to: y)", text)


def test_overlong_peer_text_is_cut_to_one_line() -> None:
    words = " ".join(["w" * 120] * 60)  # 7 kB of long words
    st = bounce(diagnostic=words, remote_mta="h" * 3000)
    dsn = build_dsn(request(received_from_mta="c" * 3000), [st], ORIGINAL, now=NOW)
    assert_wire_safe(dsn)
    per_message, per_recipient = blocks(parse(dsn))
    assert per_recipient["Diagnostic-Code"].startswith("smtp; " + "w" * 120)
    assert per_recipient["Diagnostic-Code"].endswith("...")
    assert len(per_recipient["Diagnostic-Code"]) == 900
    assert len(per_recipient["Remote-MTA"]) == 900
    assert len(per_message["Received-From-MTA"]) == 900
    assert "=?" not in dsn.decode("ascii").split("message/delivery-status")[1]


def test_8bit_original_headers_stay_inside_their_part() -> None:
    original = b"Subject: \xff\xfe caf\xc3\xa9\r\nX-Evil: a\rBcc: x@example.com\r\n\r\nbody\r\n"
    dsn = build_dsn(request(ret="HDRS"), [bounce()], original, now=NOW)
    assert_wire_safe(dsn)
    outer_header = dsn.split(b"\r\n\r\n", 1)[0]
    assert b"Bcc" not in outer_header and b"\xff" not in outer_header
    msg = parse(dsn)
    assert msg["Bcc"] is None
    assert msg.defects == []
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_content_charset() == "unknown-8bit"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    inside = b"\r\n\r\nSubject: \xff\xfe caf\xc3\xa9\r\nX-Evil: a\r\nBcc: x@example.com\r\n\r\n--"
    assert inside in dsn
    assert b"body" not in dsn.split(b"message/delivery-status")[1]


def test_boundary_never_occurs_in_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["1" * 32, "2" * 32, "3" * 32])  # placeholder, boundary, next boundary
    monkeypatch.setattr("gateway.dsn._token", lambda: next(tokens))
    trap = HEADER + b"\r\n--=_mailgate_" + b"2" * 32 + b"\r\nContent-Type: text/html\r\n\r\nx\r\n"
    dsn = build_dsn(request(ret="FULL"), [bounce()], trap)
    assert trap in dsn
    msg = parse(dsn)
    assert msg.get_boundary() == "=_mailgate_" + "3" * 32
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "message/rfc822",
    ]  # fmt: skip
    assert parts(msg)[2].get_content()["Subject"] == "quarterly report"


# --- refused input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"status": "5.1"}, "status code"),
        ({"status": "5.1.1.1"}, "status code"),
        ({"status": "6.0.0"}, "status code"),
        ({"status": "5.1234.1"}, "status code"),
        ({"status": "5.\u0661.1"}, "status code"),  # ARABIC-INDIC DIGIT ONE
        ({"status": "2.0.0"}, "does not fit"),
        ({"action": "delayed", "status": "5.0.0"}, "does not fit"),
        ({"action": "delayed", "status": "2.0.0"}, "does not fit"),
        ({"action": "delivered", "status": "4.0.0"}, "does not fit"),
        ({"action": "bounced"}, "unknown DSN action"),
        ({"will_retry_until": NOW}, "delayed"),
        ({"recipient": ""}, "recipient"),
        ({"recipient": "bob@example.com\r\nBcc: x@example.com"}, "recipient"),
        ({"recipient": "b" * 600 + "@example.com"}, "recipient"),
        ({"original_recipient": "bob@example.com"}, "addr-type;address"),
        ({"original_recipient": "rfc 822;bob@example.com"}, "addr-type;address"),
        ({"original_recipient": "rfc822;bob\n@example.com"}, "original recipient"),
    ],
)
def test_recipient_status_refuses(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(DsnError, match=match):
        bounce(**kw)


def test_failed_may_carry_a_persistent_transient_status() -> None:
    assert bounce(status="4.4.7").status == "4.4.7"  # expired after temporary failures


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"qid": "A B"}, "queue ID"),
        ({"qid": ""}, "queue ID"),
        ({"sender": "a@example.org\r\nBcc: b@example.org"}, "sender"),
        ({"reporting_mta": "mx example net"}, "reporting MTA"),
        ({"reporting_mta": "mx.example.net\r\n"}, "reporting MTA"),
        ({"ret": "ALL"}, "RET"),
        ({"envid": ""}, "ENVID"),
        ({"envid": "id\r\nBcc: x"}, "ENVID"),
    ],
)
def test_dsn_request_refuses(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(DsnError, match=match):
        request(**kw)


@pytest.mark.parametrize("sender", ["", "<>"])
def test_build_refuses_the_null_sender(sender: str) -> None:
    with pytest.raises(DsnError, match="null sender"):
        build_dsn(request(sender=sender), [bounce()], ORIGINAL)


def test_build_refuses_bad_arguments() -> None:
    with pytest.raises(DsnError, match="at least one"):
        build_dsn(request(), [], ORIGINAL)
    with pytest.raises(DsnError, match="negative"):
        build_dsn(request(), [bounce()], ORIGINAL, max_original_bytes=-1)
    with pytest.raises(DsnError, match="postmaster"):
        build_dsn(request(), [bounce()], ORIGINAL, postmaster="not an address")
    with pytest.raises(DsnError, match="sender"):
        build_dsn(request(sender="no-at-sign"), [bounce()], ORIGINAL)
