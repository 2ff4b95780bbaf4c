"""The outgoing message in queue mode: ``queued_form`` (prepend + skip over the received file)
must give exactly the bytes ``message_chunks`` writes out, in every shape of header block."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.edits import build_headers, message_chunks, queued_form
from gateway.filterapi import Action, RemoveHeader
from gateway.message import Message

SHAPES = {
    "headers and body": b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\nmore\r\n",
    "headers only, no blank line": b"From: a@b.test\r\nSubject: hi\r\n",
    "headers, blank line, no body": b"From: a@b.test\r\nSubject: hi\r\n\r\n",
    "no headers": b"\r\nbody only\r\n",
    "empty": b"",
}


def message(tmp_path: Path, data: bytes) -> Message:
    path = tmp_path / "m"
    path.write_bytes(data)
    return Message.from_spool(path, len(data))


def relayed(m: Message, form: tuple[bytes, int]) -> bytes:
    prepend, skip = form
    return prepend + m.path.read_bytes()[skip:]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("edited", [False, True])
def test_queued_form_relays_what_message_chunks_writes(tmp_path: Path, shape: str,
                                                       edited: bool) -> None:
    m = message(tmp_path, SHAPES[shape])
    headers = build_headers(m, [("Received", "by gw; id Q"), ("X-Spam-Score", "1.0")],
                            [RemoveHeader("subject")] if edited else [],
                            action=Action.ACCEPT, subject_tag="")
    form = queued_form(m, headers, max_prepend_bytes=1 << 20)
    assert form is not None
    assert relayed(m, form) == b"".join(message_chunks(m, headers))
    if not edited or b"Subject" not in SHAPES[shape]:  # untouched: only the new lines travel
        assert form == (b"Received: by gw; id Q\r\nX-Spam-Score: 1.0\r\n", 0)
    else:  # the edited block replaces the received one
        assert form[1] == m.body_offset and b"Subject" not in form[0]


def test_an_edited_header_block_over_the_cap_is_not_kept_in_the_metadata(tmp_path: Path
                                                                          ) -> None:
    m = message(tmp_path, SHAPES["headers and body"])
    headers = build_headers(m, [("X-Long", "x" * 500)], [], action=Action.REWRITE_SUBJECT,
                            subject_tag="[SPAM]")
    assert queued_form(m, headers, max_prepend_bytes=100) is None
    form = queued_form(m, headers, max_prepend_bytes=1000)
    assert form is not None and form[1] == m.body_offset
    assert relayed(m, form) == b"".join(message_chunks(m, headers))
    untouched = build_headers(m, [("X-Long", "x" * 500)], [], action=Action.ACCEPT,
                              subject_tag="")
    assert queued_form(m, untouched, max_prepend_bytes=100) == (  # new lines are never capped
        b"X-Long: " + b"x" * 500 + b"\r\n", 0)


@pytest.mark.parametrize("rcpt", [None, "user@example.test", '"two  spaces"@example.test'])
@pytest.mark.parametrize("ip", ["192.0.2.7", "2001:db8::7"])
def test_the_received_value_is_the_folded_header_unfolded(ip: str, rcpt: str | None) -> None:
    """The engine puts ``received_value`` (whitespace runs collapsed) through the header
    builder, which folds it: the same field ``received_header`` gives (spamd's filter)."""
    from gateway.edits import TraceInfo, received_header, received_value

    t = TraceInfo("mx.example.test", "06H2G6HK9XSA9BT9", ip, "client.example.test",
                  "ESMTPS", rcpt)
    folded = received_header(t, 1764410000.0)
    value = received_value(t, 1764410000.0)
    assert folded.startswith(b"Received: from client.example.test ([")
    assert b"\r\n\t" in folded  # long enough to be folded
    name, _, unfolded = folded.decode().partition(":")
    assert name == "Received" and " ".join(unfolded.split()) == " ".join(value.split())
    ip_text = f"IPv6:{ip}" if ":" in ip else ip
    rcpt_text = f" for <{rcpt}>" if rcpt else ""
    assert value == (f"from client.example.test ([{ip_text}]) by mx.example.test (mailgate) with "
                     f"ESMTPS id 06H2G6HK9XSA9BT9{rcpt_text}; Sat, 29 Nov 2025 09:53:20 GMT")
    built = build_headers(message_stub(), [("Received", " ".join(value.split()))], [],
                          action=Action.ACCEPT, subject_tag="")
    collapsed = rcpt is not None and "  " in rcpt  # as the engine's value had been before
    assert built == (folded.replace(b"two  spaces", b"two spaces") if collapsed else folded)


def message_stub() -> Message:
    return Message.from_head(Path("/nonexistent"), 2, b"\r\n")


def test_header_values_lose_their_line_breaks() -> None:
    built = build_headers(message_stub(), [("X-Note", "one\r\ntwo\nthree")], [],
                          action=Action.ACCEPT, subject_tag="")
    assert built == b"X-Note: one two three\r\n"


EXTRA_SHAPES = {
    **SHAPES,
    "folded and odd lines": b"Received: from a\r\n\tby b\r\n  leading: space\r\nX-Spam-Flag: YES\r\n"
                            b"Subject: s\r\n\r\nbody\r\n",
    "no CRLF after the last header": b"From: a@b.test\r\nSubject: hi",
    "capped block": b"From: a@b.test\r\n" + b"X-Long: " + b"y" * 40 + b"\r\n",
}


@pytest.mark.parametrize("shape", EXTRA_SHAPES)
@pytest.mark.parametrize("remove", [None, "X-Absent", "x-spam-", "Subject"])
def test_an_unedited_header_block_is_copied_whole_as_the_split_headers_would_give_it(
        tmp_path: Path, shape: str, remove: str | None) -> None:
    """``build_headers`` copies the block without splitting it when no edit can touch it; the
    result is what the header-by-header path gives (forced here by a removal whose non-ASCII
    name matches nothing)."""
    data = EXTRA_SHAPES[shape]
    edits = [RemoveHeader(remove, name_prefix=remove.endswith("-"))] if remove else []
    prepend = [("Received", "from x by y; date")]
    m = message(tmp_path, data)
    got = build_headers(m, prepend, edits, action=Action.ACCEPT, subject_tag="[SPAM]")
    copied = m._headers is None  # the block was never split
    slow = build_headers(message(tmp_path, data), prepend, [*edits, RemoveHeader("ñ-none")],
                         action=Action.ACCEPT, subject_tag="[SPAM]")
    assert got == slow
    name = (remove or "").lower().encode()
    touched = remove is not None and name in data.lower().split(b"\r\n\r\n")[0]
    complete = data.split(b"\r\n\r\n")[0].endswith(b"\r\n") or b"\r\n\r\n" in data or not data
    assert copied == (not touched and complete), (copied, touched, complete)
