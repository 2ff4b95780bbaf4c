"""The headers filter: RFC 5322 3.6 field counts as symbols."""

from __future__ import annotations

import asyncio

import pytest

from filters.headers import HeadersFilter
from gateway.filterapi import Client, ConfigError, FilterContext, Stage
from gateway.message import Message
from gateway.services import Services

GOOD = (b"From: a@example.test\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <1@example.test>\r\nSubject: s\r\n\r\nbody\r\n")


def symbols(tmp_path, data: bytes) -> dict[str, tuple[str, ...]]:
    path = tmp_path / "m"
    path.write_bytes(data)
    msg = Message.from_spool(path, len(data))
    ctx = FilterContext(stage=Stage.MESSAGE, qid="Q", client=Client("192.0.2.1", 1),
                        message=msg)
    res = asyncio.run(HeadersFilter.from_config({}, Services()).on_message(ctx))
    return {s.name: s.options for s in res.symbols}


def test_good_message_has_no_symbols(tmp_path):
    assert symbols(tmp_path, GOOD) == {}


@pytest.mark.parametrize("data,expected", [
    (GOOD.replace(b"From: a@example.test\r\n", b""), {"HEADERS_MISSING_FROM"}),
    (b"From: b@example.test\r\n" + GOOD, {"HEADERS_MULTIPLE_FROM"}),
    (GOOD.replace(b"a@example.test", b"nobody"), {"HEADERS_BAD_FROM"}),
    # no usable author domain (what dmarc leaves to this filter): every address needs both
    (GOOD.replace(b"a@example.test", b"a@"), {"HEADERS_BAD_FROM"}),
    (GOOD.replace(b"a@example.test", b"a@example.test, b"), {"HEADERS_BAD_FROM"}),
    (GOOD.replace(b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n", b""), {"HEADERS_MISSING_DATE"}),
    (GOOD.replace(b"Sat, 28 Nov 2026 10:00:00 +0000", b"yesterday"), {"HEADERS_BAD_DATE"}),
    (GOOD.replace(b"Message-ID: <1@example.test>\r\n", b""), {"HEADERS_MISSING_MESSAGE_ID"}),
    (b"Subject: again\r\n" + GOOD, {"HEADERS_DUPLICATE"}),
    (b"\r\nno headers at all\r\n", {"HEADERS_EMPTY"}),
])
def test_each_problem_gives_its_symbol(tmp_path, data, expected):
    assert set(symbols(tmp_path, data)) == expected


def test_duplicate_lists_the_fields(tmp_path):
    data = b"Subject: x\r\nTo: a@b.test\r\nTo: c@d.test\r\n" + GOOD
    assert symbols(tmp_path, data)["HEADERS_DUPLICATE"] == ("to", "subject")


def test_folded_headers_are_one_header(tmp_path):
    data = GOOD.replace(b"Subject: s\r\n", b"Subject: a\r\n long\r\n\tsubject\r\n")
    assert symbols(tmp_path, data) == {}


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        HeadersFilter.from_config({"strict": True}, Services())
    assert e.value.key == "strict"
