"""gateway.mimebounds through gateway.mime: the MIME parse stops at its structural bounds
(depth, entities, header fields, encoded words) with a finding, never a RecursionError, and
a message at a bound is parsed whole."""

from __future__ import annotations

import asyncio
import email.message
import logging
import time
from pathlib import Path

import pytest

from filters.mime import MimeFilter
from gateway import mime, mimebounds, patches
from gateway.errors import PolicyError
from gateway.filterapi import Action
from gateway.message import Message
from gateway.mimebounds import MimeLimits, nested
from gateway.policy.loader import parse_policy
from gateway.services import Services

DEEP = nested(2000, b"Content-Type: text/plain\r\n\r\nthe bottom\r\n")


def test_2000_nested_multiparts_are_cut_at_the_depth_bound_without_recursion_error() -> None:
    view = mime.parse_bytes(DEEP)  # the old parse: RecursionError
    assert view.limits == (("MIME_TOO_DEEP", "more than 50 levels"),)
    [part] = view.parts  # level 51, a container, read as one opaque leaf
    assert part.content_type == "application/octet-stream"
    assert b"the bottom" in part.payload and b"--b1999--" in part.payload


@pytest.mark.parametrize("levels, found", [(50, ()), (51, (("MIME_TOO_DEEP",
                                                            "more than 50 levels"),))])
def test_the_depth_bound_is_exact(levels: int, found: tuple[tuple[str, str], ...]) -> None:
    view = mime.parse_bytes(nested(levels, b"Content-Type: text/plain\r\n\r\nthe bottom\r\n"))
    assert view.limits == found
    if not found:
        [text] = view.texts
        assert text.text.strip() == "the bottom"


def test_message_rfc822_levels_count_too() -> None:
    inner = b"Content-Type: text/plain\r\n\r\nbottom\r\n"
    for _ in range(9):
        inner = b"Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\n" + inner
    # nine message/rfc822 containers, the text at level 10
    assert mime.parse_bytes(inner, MimeLimits(max_depth=9)).limits == ()
    assert mime.parse_bytes(inner, MimeLimits(max_depth=9)).texts[0].text.strip() == "bottom"
    assert mime.parse_bytes(inner, MimeLimits(max_depth=8)).limits \
        == (("MIME_TOO_DEEP", "more than 8 levels"),)


def flat(parts: int) -> bytes:
    return (b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
            + b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * parts + b"--b--\r\n")


def test_the_parts_bound_is_exact_and_stops_the_parse_early() -> None:
    lim = MimeLimits(max_parts=5)  # the message itself and 4 leaves
    assert mime.parse_bytes(flat(4), lim).limits == ()
    assert len(mime.parse_bytes(flat(4), lim).parts) == 4
    cut = mime.parse_bytes(flat(5), lim)
    assert cut.limits == (("MIME_TOO_MANY_PARTS", "more than 5 parts"),)
    assert len(cut.parts) == 4
    # a million empty parts: the old parse read them all (12 s, 337 MB), this one stops
    huge = (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * 500_000
            + b"--b--\r\n")
    t0 = time.process_time()
    assert mime.parse_bytes(huge).limits[0][0] == "MIME_TOO_MANY_PARTS"
    assert time.process_time() - t0 < 2.0


def test_the_headers_bound_is_per_header_block() -> None:
    lim = MimeLimits(max_headers=10)
    top = b"".join(b"X-H%d: v\r\n" % i for i in range(9)) + b"Subject: s\r\n\r\nbody\r\n"
    assert mime.parse_bytes(top, lim).limits == ()
    over = b"X-Extra: 1\r\n" + top
    view = mime.parse_bytes(over, lim)
    assert view.limits == (("MIME_TOO_MANY_HEADERS", "more than 10 in a header block"),)
    assert len(view.headers) == 10


def test_the_encoded_words_bound_leaves_the_rest_undecoded() -> None:
    words = " ".join(["=?utf-8?q?J=C3=B6rg?="] * 10)
    msg = f"Subject: {words}\r\nX-Other: =?utf-8?q?=C3=A9?=\r\n\r\nbody\r\n".encode()
    assert mime.parse_bytes(msg, MimeLimits(max_encoded_words=11)).limits == ()
    view = mime.parse_bytes(msg, MimeLimits(max_encoded_words=10))
    assert view.limits == (("MIME_TOO_MANY_ENCODED_WORDS", "more than 10"),)
    assert view.subject.startswith("Jörg")
    assert view.header_values("X-Other") == ["=?utf-8?q?=C3=A9?="]


def test_the_spool_parse_uses_the_messages_limits(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(DEEP)
    msg = Message.from_spool(path, len(DEEP), MimeLimits(max_depth=7))
    view = asyncio.run(mime.view(msg))
    assert view.limits == (("MIME_TOO_DEEP", "more than 7 levels"),)


def test_when_the_stdlib_no_longer_honours_the_hooks_the_depth_is_bounded_by_a_count(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert mimebounds.bounds_hold()  # this Python: the hooks work as assumed
    assert patches.active("email.feedparser-bounds")
    # a parser that attaches parts only once they are read: the depth is never known in time
    with monkeypatch.context() as m:
        m.setattr(mimebounds.BoundedMessage, "attach", email.message.Message.attach)
        patches.forget("email.feedparser-bounds")
        try:
            with caplog.at_level(logging.WARNING, logger="mailgate.patches"):
                assert not patches.install("email.feedparser-bounds", mimebounds.check_bounds)
        finally:
            patches.forget("email.feedparser-bounds")
    assert [r.getMessage() for r in caplog.records] == [
        "patch email.feedparser-bounds disabled, the library's own path is used: 8 levels "
        "with a bound of 3 parsed 9 deep (deepest cut 0)"]
    assert patches.install("email.feedparser-bounds", mimebounds.check_bounds)  # restored
    monkeypatch.setattr(mimebounds, "_proven", False)
    assert mime.parse_bytes(DEEP).limits[0][0] == "MIME_TOO_DEEP"
    path = tmp_path / "m"
    path.write_bytes(DEEP)
    assert mime.parse_message(Message.from_spool(path, len(DEEP))).limits[0][0] \
        == "MIME_TOO_DEEP"
    assert mime.parse_bytes(nested(3)).limits == ()


def test_the_mime_filter_refuses_for_good_with_554_5_6_0() -> None:
    f = MimeFilter.from_config({}, Services())
    r = f.result(mime.parse_bytes(DEEP).limits)
    assert [(s.name, s.options) for s in r.symbols] == [("MIME_TOO_DEEP",
                                                         ("more than 50 levels",))]
    assert r.verdict is not None and r.verdict.action is Action.REJECT
    assert r.verdict.reply is not None
    assert (r.verdict.reply.code, r.verdict.reply.status) == (554, "5.6.0")
    assert "MIME_TOO_DEEP" in r.verdict.reply.text
    scored = MimeFilter.from_config({"action": "none"}, Services()).result(
        mime.parse_bytes(DEEP).limits)
    assert scored.verdict is None and scored.symbols[0].score == 10.0


def test_policy_limits_and_their_upper_bound() -> None:
    base = {"server": {"hostname": "h.test"}, "domains": {"accepted": ["example.test"]}}
    p = parse_policy(base, "p.toml")
    assert (p.limits.max_mime_depth, p.limits.max_mime_parts, p.limits.max_mime_headers,
            p.limits.max_mime_encoded_words) == (50, 1000, 1000, 1000)
    with pytest.raises(PolicyError, match=r"p\.toml: limits\.max_mime_depth: must be an "
                                          r"integer from 1 to 200"):
        parse_policy({**base, "limits": {"max_mime_depth": 201}}, "p.toml")
