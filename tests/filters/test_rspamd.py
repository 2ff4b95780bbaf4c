"""The rspamd filter against a real, offline Rspamd (tests/support/rspamd.py; a cold start
compiles its Hyperscan cache once, ~17 s, kept in a cache dir), plus fake HTTP servers for the
request format and the failure modes, and its settings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from filters.rspamd import RspamdError, RspamdFilter
from gateway.filterapi import Client, ConfigError, FilterContext, Result, Stage
from gateway.message import Message
from gateway.services import Services
from gateway.smtp.address import Address
from tests.support import rspamd, scanning
from tests.support.scanning import by_name, message

skip_no_rspamd = pytest.mark.skipif(rspamd.rspamd_unavailable_reason() is not None,
                                    reason=rspamd.rspamd_unavailable_reason() or "")


def ctx(msg: Message, sender: Address | None = None) -> FilterContext:
    return FilterContext(
        stage=Stage.MESSAGE, qid="QID2", client=Client("192.0.2.10", 4000, "mail.example.test"),
        sender=sender or Address("a", "example.test"),
        recipients=(Address("bob", "example.test"), Address("carol", "example.test")),
        message=msg)


def make(**cfg: object) -> RspamdFilter:
    return RspamdFilter.from_config(cfg, Services())


def scan(f: RspamdFilter, msg: Message) -> Result:
    return asyncio.run(f.on_message(ctx(msg)))


@pytest.fixture(scope="module")
def rs() -> rspamd.RspamdInstance:
    if rspamd.rspamd_unavailable_reason():
        pytest.skip(rspamd.rspamd_unavailable_reason() or "")
    return rspamd.shared()


@skip_no_rspamd
def test_gtube_is_rejected_by_rspamd(rs: rspamd.RspamdInstance, tmp_path: Path) -> None:
    res = scan(make(url=rs.url), message(tmp_path, "gtube.eml"))
    syms = by_name(res)
    assert res.data["action"] == "reject" and res.data["score"] == 15.0
    assert syms["RSPAMD_ACTION_REJECT"] == (("15/15",), None)
    assert syms["RSPAMD_GTUBE"] == ((), 0.0)  # the prefilter sets the total, not the symbol
    assert syms["RSPAMD_SCORE"] == (("15/15",), 15.0)  # ... so the remainder carries it
    assert sum(s.score or 0.0 for s in res.symbols) == pytest.approx(15.0)


@skip_no_rspamd
def test_ham_imports_symbols_with_scores(rs: rspamd.RspamdInstance, tmp_path: Path) -> None:
    res = scan(make(url=rs.url, score_factor=2), message(tmp_path, "sa-sample-nonspam.eml"))
    syms = by_name(res)
    assert res.data["action"] != "reject" and res.data["score"] < res.data["required_score"]
    assert "RSPAMD_ACTION_REJECT" not in syms and "RSPAMD_GTUBE" not in syms
    action = "RSPAMD_ACTION_" + res.data["action"].upper().replace(" ", "_")
    assert action in syms
    # rspamd saw our envelope: both recipients, the sender, a client IP without rDNS
    assert {"s:bob@example.test", "s:carol@example.test"} <= set(
        syms["RSPAMD_FORGED_RECIPIENTS"][0])
    assert "a@example.test" in syms["RSPAMD_FORGED_SENDER"][0]
    assert "RSPAMD_HFILTER_HOSTNAME_UNKNOWN" in syms
    assert syms["RSPAMD_HFILTER_HOSTNAME_UNKNOWN"][1] == 2 * res.data["symbols"][
        "HFILTER_HOSTNAME_UNKNOWN"]
    assert syms["RSPAMD_HAS_REPLYTO"][0] == ("tbtf-approval@europe.std.com",)
    assert sum(s.score or 0.0 for s in res.symbols) == pytest.approx(2 * res.data["score"])


def test_larger_than_max_bytes_is_skipped_without_asking(tmp_path: Path) -> None:
    msg = message(tmp_path, "gtube.eml")
    f = make(url=f"http://127.0.0.1:{rspamd.free_port()}", max_bytes=100, prefix="RS_")
    assert by_name(scan(f, msg)) == {"RS_SKIPPED": ((f"size {msg.size} > 100",), None)}


def with_server(reply: bytes | None, msg: Message, sender: Address | None = None,
                **cfg: object) -> tuple[Result, list[bytes]]:
    seen: list[bytes] = []

    async def use(port: int) -> Result:
        return await make(url=f"http://127.0.0.1:{port}/rs", **cfg).on_message(ctx(msg, sender))
    return scanning.with_server(scanning.recording(seen, reply), use), seen


def http(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_request_carries_the_envelope(tmp_path: Path) -> None:
    msg = message(tmp_path, "sa-sample-nonspam.eml")
    reply = {"score": 6.5, "required_score": 15, "action": "add header", "symbols": {
        "R_A": {"name": "R_A", "score": 4.0, "options": ["x", "y"]},
        "sym.with-dash": {"name": "sym.with-dash", "score": 2.0}}}
    res, seen = with_server(http(json.dumps(reply).encode()), msg, sender=Address("", ""))
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /rs/checkv2 HTTP/1.1"
    assert set(lines[1:]) >= {f"Content-Length: {len(body)}", "Connection: close",
                              "IP: 192.0.2.10", "Helo: mail.example.test", "From: <>",
                              "Queue-Id: QID2", "Rcpt: bob@example.test",
                              "Rcpt: carol@example.test"}
    assert body == msg.path.read_bytes()
    assert by_name(res) == {"RSPAMD_R_A": (("x", "y"), 4.0),
                            "RSPAMD_SYM_WITH_DASH": ((), 2.0),
                            "RSPAMD_SCORE": (("6.5/15",), 0.5),
                            "RSPAMD_ACTION_ADD_HEADER": (("6.5/15",), None)}


@pytest.mark.parametrize("reply,match", [
    (http(b"{}", "500 Internal Server Error"), "500"),
    (http(b"not json"), "not JSON"),
    (http(b'{"score": 1}'), "unexpected reply"),
    (http(b'{"score": 1, "action": "x", "symbols": [1]}'), "unexpected reply"),
    (b"garbage", "header block"),
    (http(b'{"score": 1.0, "action": "no action"}')[:-5], "cut short"),
])
def test_bad_replies_raise(tmp_path: Path, reply: bytes, match: str) -> None:
    with pytest.raises(RspamdError, match=match):
        with_server(reply, message(tmp_path, "gtube.eml"))


def test_silent_server_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        with_server(None, message(tmp_path, "gtube.eml"), scan_timeout_s=0.3)


def test_refused_connection_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        scan(make(url=f"http://127.0.0.1:{rspamd.free_port()}"), message(tmp_path, "gtube.eml"))


@pytest.mark.parametrize("cfg,key", [
    ({"url": "https://127.0.0.1:11333"}, "url"),
    ({"url": "127.0.0.1:11333"}, "url"),
    ({"url": "http://127.0.0.1:99999"}, "url"),
    ({"prefix": "R-"}, "prefix"),
    ({"score_factor": "1"}, "score_factor"),
    ({"password": "q1"}, "password"),
])
def test_bad_settings_name_the_key(cfg: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        make(**cfg)
    assert e.value.key == key


def test_defaults() -> None:
    f = make()
    assert (f.host, f.port, f.path, f.timeout_s, f.max_bytes, f.prefix, f.factor) == \
        ("127.0.0.1", 11333, "", 8.0, 10 * 1024 * 1024, "RSPAMD_", 1.0)
