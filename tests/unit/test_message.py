"""``HeadCapture`` + ``Message.from_head`` (what the end of DATA uses) must give the same Message
as reading the file back (``Message.from_spool``), however DATA was cut into writes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway import message as message_mod
from gateway.message import HeadCapture, Message

SHAPES = [
    b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n",
    b"From: a@b.test\r\nSubject: hi\r\n",  # headers only
    b"From: a@b.test\r\n\r\n",
    b"\r\nbody only\r\n",
    b"\r\n",
    b"",
    b"Subject: folded\r\n continued\r\nX: y\r\n\r\n\r\n\r\nbody after blank lines\r\n",
    b"X-Long: " + b"v" * 300 + b"\r\n" * 1,  # no end of headers within the cap (set to 64)
    b"X-A: 1\r\nX-B: 2\r\nX-C: " + b"c" * 100 + b"\r\n\r\nbody\r\n",  # end beyond the cap
]


@pytest.mark.parametrize("data", SHAPES)
def test_captured_head_gives_the_same_message_as_reading_back(
        tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_mod, "MAX_HEADER_BYTES", 64)
    path = tmp_path / "m"
    path.write_bytes(data)
    want = Message.from_spool(path, len(data))
    rng = random.Random(len(data))
    for _ in range(200):  # random cuts, including 1-byte writes across CR LF CR LF
        cap, i = HeadCapture(), 0
        while i < len(data):
            n = rng.choice((1, 1, 2, 3, 5, 17, 64, 1000))
            cap.feed(data[i:i + n])
            i += n
        assert len(cap.head) <= 64
        assert Message.from_head(path, len(data), cap.head) == want, cap.head
        if b"\r\n\r\n" in cap.head or cap.head.startswith(b"\r\n"):  # nothing past the block
            assert cap.head == want.header_bytes, cap.head


def test_capture_stops_at_the_end_of_the_header_block() -> None:
    cap = HeadCapture()
    cap.feed(b"From: a@b.test\r\n\r")
    assert not cap.done
    cap.feed(b"\nbody\r\n")
    assert cap.done
    cap.feed(b"more body " * 1000)
    assert cap.head == b"From: a@b.test\r\n\r\n"  # the body that came along is not kept


def test_take_hands_the_capture_over_and_keeps_no_copy() -> None:
    cap = HeadCapture()
    cap.feed(b"From: a@b.test\r\n\r\nbody\r\n")
    assert cap.take() == b"From: a@b.test\r\n\r\n"
    assert cap.head == b"" and cap.done
    cap.feed(b"X: late\r\n\r\n")  # a feed after the hand-over keeps nothing either
    assert cap.head == b""
