"""The spamd filter against a real, offline spamd (tests/support/spamd.py), plus fake servers
for the failure modes (refused, silent, garbage) and its settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from filters.spamd import SpamdError, SpamdFilter, parse_reply
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage
from gateway.message import Message
from gateway.services import Services
from gateway.smtp.address import Address
from tests.support import scanning, spamd
from tests.support.scanning import Handler, by_name, message

skip_no_spamd = pytest.mark.skipif(spamd.spamd_unavailable_reason() is not None,
                                   reason=spamd.spamd_unavailable_reason() or "")


def ctx(msg: Message, tls: bool = False) -> FilterContext:
    return FilterContext(stage=Stage.MESSAGE, qid="QID1", client=Client(
        "192.0.2.10", 4000, "mail.example.test", tls=tls), sender=Address("a", "example.test"),
        recipients=(Address("bob", "example.test"),), message=msg)


def make(**cfg: object) -> SpamdFilter:
    return SpamdFilter.from_config(cfg, Services(hostname="mx.gateway.test"))


def scan(f: SpamdFilter, msg: Message) -> Result:
    return asyncio.run(f.on_message(ctx(msg)))


@pytest.fixture(scope="module")
def sa() -> spamd.SpamdInstance:
    if spamd.spamd_unavailable_reason():
        pytest.skip(spamd.spamd_unavailable_reason() or "")
    return spamd.shared()


@skip_no_spamd
def test_gtube_imports_rules_with_their_scores(sa: spamd.SpamdInstance, tmp_path: Path) -> None:
    res = scan(make(address=sa.address), message(tmp_path, "gtube.eml"))
    syms = by_name(res)
    assert syms["SA_GTUBE"] == (("1000",), 1000.0)
    total = res.data["score"]
    summary = f"{total:g}/5"
    assert syms["SA_SPAM"] == ((summary,), None)  # no imported score: the total is in the rules
    assert syms["SA_SCORE"] == ((summary,), 0.0)  # the rules account for the whole total
    assert total >= 1000.0 and sum(s.score or 0.0 for s in res.symbols) == pytest.approx(total)
    assert res.data["spam"] is True and res.data["threshold"] == 5.0
    assert res.data["rules"]["GTUBE"] == 1000.0
    # our Received line reached spamd: it sees the client (TEST-NET 192.0.2.10, no rDNS)
    # instead of a message without any Received header
    assert "SA_NO_RECEIVED" not in syms and "SA_RDNS_NONE" in syms


@skip_no_spamd
def test_ham_is_not_spam_and_scores_low(sa: spamd.SpamdInstance, tmp_path: Path) -> None:
    res = scan(make(address=sa.address), message(tmp_path, "sa-sample-nonspam.eml"))
    syms = by_name(res)
    assert "SA_SPAM" not in syms and "SA_GTUBE" not in syms
    assert res.data["spam"] is False and res.data["score"] < 5.0
    assert sum(s.score or 0.0 for s in res.symbols) == pytest.approx(res.data["score"], abs=0.01)


@skip_no_spamd
def test_unix_socket_prefix_and_factor(sa: spamd.SpamdInstance, tmp_path: Path) -> None:
    f = make(address=sa.socket_address, prefix="SPAMASSASSIN_", score_factor=0.01,
             user="nobody", scan_timeout_s=5)
    syms = by_name(scan(f, message(tmp_path, "gtube.eml")))
    assert syms["SPAMASSASSIN_GTUBE"] == (("1000",), 10.0)
    assert "SPAMASSASSIN_SPAM" in syms and "SA_GTUBE" not in syms


def test_larger_than_max_bytes_is_skipped_without_asking(tmp_path: Path) -> None:
    msg = message(tmp_path, "gtube.eml")
    f = make(address=f"127.0.0.1:{spamd.free_port()}", max_bytes=msg.size - 1)  # nobody there
    res = scan(f, msg)
    assert by_name(res) == {"SA_SKIPPED": ((f"size {msg.size} > {msg.size - 1}",), None)}


def with_server(handler: Handler, f_cfg: dict[str, object], msg: Message) -> Result:
    async def use(port: int) -> Result:
        return await make(address=f"127.0.0.1:{port}", **f_cfg).on_message(ctx(msg, True))
    return scanning.with_server(handler, use)


def test_request_format_and_a_bad_reply(tmp_path: Path) -> None:
    msg = message(tmp_path, "sa-sample-nonspam.eml")
    seen: list[bytes] = []
    handler = scanning.recording(seen, b"SPAMD/1.1 76 EX_PROTOCOL\r\n\r\n")
    with pytest.raises(SpamdError, match="EX_PROTOCOL"):
        with_server(handler, {"user": "alice"}, msg)
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"REPORT SPAMC/1.5", f"Content-length: {len(body)}".encode(),
                                   b"User: alice"]
    assert body.startswith(b"Received: from mail.example.test ([192.0.2.10]) by "
                           b"mx.gateway.test (mailgate)\r\n\twith ESMTPS id QID1 for")
    assert body.endswith(msg.path.read_bytes())


def test_silent_server_times_out(tmp_path: Path) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        with_server(handler, {"scan_timeout_s": 0.3}, message(tmp_path, "gtube.eml"))


def test_refused_connection_raises(tmp_path: Path) -> None:
    f = make(address=f"127.0.0.1:{spamd.free_port()}")
    with pytest.raises(OSError):
        scan(f, message(tmp_path, "gtube.eml"))


def test_parse_report_with_wrapped_lines_and_a_rounding_remainder() -> None:
    raw = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 1\r\nSpam: True ; 7.3 / 5.0\r\n\r\n"
           b"Content analysis details:   (7.3 points, 5.0 required)\r\n\r\n"
           b" pts rule name              description\r\n"
           b"---- ---------------------- ------------------------------------------\r\n"
           b" 3.5 URIBL_BLACK            Contains an URL listed in the URIBL blacklist\r\n"
           b"                            [URIs: example.com]\r\n"
           b"-0.0 NO_RELAYS              Informational: message was not relayed\r\n"
           b" 3.8 T_lower_Case           Mixed case rule name\r\n")
    spam, total, threshold, rules = parse_reply(raw)
    assert (spam, total, threshold) == (True, 7.3, 5.0)
    assert rules == [("URIBL_BLACK", "3.5"), ("NO_RELAYS", "-0.0"), ("T_lower_Case", "3.8")]
    res = make()._result(spam, total, threshold, rules)
    syms = by_name(res)
    assert syms["SA_T_LOWER_CASE"] == (("3.8",), 3.8)
    assert syms["SA_NO_RELAYS"] == (("-0.0",), 0.0)
    assert syms["SA_SCORE"] == (("7.3/5",), 0.0)
    # a report without the rule table (a site template): the whole total goes to SA_SCORE
    assert by_name(make(score_factor=2)._result(True, 7.3, 5.0, []))["SA_SCORE"][1] == 14.6
    with pytest.raises(SpamdError):
        parse_reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n")  # no Spam: header
    with pytest.raises(SpamdError):
        parse_reply(b"HTTP/1.0 200 OK\r\n\r\n")


@pytest.mark.parametrize("cfg,key", [
    ({"address": "localhost"}, "address"),
    ({"address": "unix:relative.sock"}, "address"),
    ({"address": "127.0.0.1:99999"}, "address"),
    ({"prefix": "sa_"}, "prefix"),
    ({"score_factor": -1}, "score_factor"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"scan_timeout_s": 0}, "scan_timeout_s"),
    ({"user": "a b"}, "user"),
    ({"adress": "x"}, "adress"),
])
def test_bad_settings_name_the_key(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(**cfg)
    assert e.value.key == key


def test_defaults() -> None:
    f = make()
    assert (f.address, f.timeout_s, f.max_bytes, f.prefix, f.factor, f.user) == \
        (("127.0.0.1", 783), 8.0, 1024 * 1024, "SA_", 1.0, None)
    assert make(address="[::1]:7830").address == ("::1", 7830)
    assert make(address="tcp:spamd.local:783").address == ("spamd.local", 783)
    assert make(address="unix:/run/spamd.sock").address == "/run/spamd.sock"
