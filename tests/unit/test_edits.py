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
