"""The rcpt filter: 550 5.1.1 for unknown users in the domains its list or map covers."""

from __future__ import annotations

import asyncio

import pytest

from filters.rcpt import RcptFilter
from gateway.filterapi import Action, Client, ConfigError, FilterContext, Stage
from gateway.services import Services
from gateway.smtp.address import Address


def check(f: RcptFilter, local: str, domain: str):
    ctx = FilterContext(stage=Stage.RCPT, qid="Q9", client=Client("192.0.2.1", 1),
                        rcpt=Address(local, domain))
    return asyncio.run(f.on_rcpt(ctx))


def test_listed_addresses_and_unknown_users(tmp_path):
    f = RcptFilter.from_config({"recipients": ["alice@example.test", "@open.test"]}, Services())
    ok = check(f, "Alice", "EXAMPLE.test")
    assert ok.verdict is None and [s.name for s in ok.symbols] == ["RCPT_KNOWN"]
    bad = check(f, "mallory", "example.test")
    assert bad.verdict is not None and bad.verdict.action is Action.REJECT
    assert bad.verdict.reply is not None
    assert (bad.verdict.reply.code, bad.verdict.reply.status) == (550, "5.1.1")
    assert "mallory@example.test" in bad.verdict.reply.text
    assert check(f, "anyone", "open.test").verdict is None
    # a domain the filter knows nothing about is not its business
    other = check(f, "x", "elsewhere.test")
    assert other.verdict is None and other.symbols == ()


def test_map_file_and_extra_domains(tmp_path):
    m = tmp_path / "rcpts"
    m.write_text("# users\nbob@example.test   OK\n\n@lists.example.test\n")
    f = RcptFilter.from_config({"recipient_map_file": str(m), "domains": ["empty.test"]},
                               Services())
    assert check(f, "bob", "example.test").verdict is None
    assert check(f, "carol", "example.test").verdict is not None
    assert check(f, "any", "lists.example.test").verdict is None
    assert check(f, "any", "empty.test").verdict is not None


@pytest.mark.parametrize("cfg,key", [
    ({"recipients": "alice@example.test"}, "recipients"),
    ({"recipients": ["no-at-sign"]}, "recipients"),
    ({"recipient_map_file": "/nonexistent/map"}, "recipient_map_file"),
    ({"typo": 1}, "typo"),
])
def test_bad_settings_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as e:
        RcptFilter.from_config(cfg, Services())
    assert e.value.key == key
