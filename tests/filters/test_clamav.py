"""The clamav filter against a real clamd (tests/support/clamd.py: offline, the two-signature
test database): EICAR plain / zipped / as a MIME attachment, every clamav-testfiles sample, the
clean SpamAssassin corpus, both transports, the failure paths (clamd down, hung, refusing the
stream) and the size cap."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filters.clamav import (
    ClamavFilter,
    Clamd,
    ClamdAddress,
    ClamdError,
    file_chunks,
    parse_reply,
)
from gateway.filterapi import Action, Client, ConfigError, FilterContext, Result, Stage
from gateway.message import Message
from gateway.replies import Reply
from gateway.services import Services
from tests.support import clamd as support
from tests.support.clamd import (
    CORPORA,
    EICAR,
    EICAR_NAME,
    SKIP_REASON,
    TESTFILE_NAME,
    ClamdServer,
    HangingServer,
    free_port,
    mail_with_attachments,
)

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

TESTFILES = CORPORA / "clamav-testfiles"
SAMPLES = sorted(p for p in TESTFILES.glob("*")
                 if p.is_file() and p.name not in ("SOURCE.md", "debian-copyright"))
SPAMASSASSIN = CORPORA / "spamassassin" / "train"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def clamd() -> Iterator[ClamdServer]:
    with support.shared() as server:
        yield server


@pytest.fixture(params=["tcp", "unix"])
def address(request: pytest.FixtureRequest, clamd: ClamdServer) -> str:
    return clamd.tcp_address if request.param == "tcp" else clamd.unix_address


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def message(attachments: list[tuple[str, bytes]], text: str = "Hello.\n") -> bytes:
    return mail_with_attachments(attachments, text=text)


def zipped(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def spool(tmp_path: Path, data: bytes, name: str = "msg") -> Message:
    path = tmp_path / name
    path.write_bytes(data)
    return Message.from_spool(path, len(data))


def context(msg: Message) -> FilterContext:
    return FilterContext(stage=Stage.MESSAGE, qid="0000000000000QID",
                         client=Client("192.0.2.1", 40000), message=msg)


def make(address: str, **cfg: Any) -> ClamavFilter:
    return ClamavFilter.from_config({"address": address, **cfg}, Services())


def scan(tmp_path: Path, data: bytes, address: str, **cfg: Any) -> Result:
    return asyncio.run(make(address, **cfg).on_message(context(spool(tmp_path, data))))


def symbols(result: Result) -> dict[str, tuple[str, ...]]:
    return {s.name: s.options for s in result.symbols}


# -- detection ---------------------------------------------------------------------------------
def test_eicar_plain_is_rejected_with_the_signature_name(tmp_path: Path, address: str) -> None:
    res = scan(tmp_path, EICAR, address)
    assert symbols(res) == {"CLAMAV_VIRUS": (EICAR_NAME,)}
    assert res.verdict is not None and res.verdict.action is Action.REJECT
    assert res.verdict.reply == Reply(554, "5.7.1", f"Message rejected: virus found: {EICAR_NAME}")
    assert res.data["virus"] == EICAR_NAME and res.data["truncated"] is False


def test_eicar_as_base64_attachment(tmp_path: Path, address: str) -> None:
    data = message([("eicar.com", EICAR)])
    assert EICAR not in data and base64.b64encode(EICAR)[:40] in data  # really encoded
    assert symbols(scan(tmp_path, data, address)) == {"CLAMAV_VIRUS": (EICAR_NAME,)}


def test_eicar_zipped_raw_and_attached(tmp_path: Path, clamd: ClamdServer) -> None:
    z = zipped("eicar.com", EICAR)
    assert EICAR not in z
    assert symbols(scan(tmp_path, z, clamd.tcp_address)) == {"CLAMAV_VIRUS": (EICAR_NAME,)}
    data = message([("eicar.zip", z)])
    assert symbols(scan(tmp_path, data, clamd.tcp_address)) == {"CLAMAV_VIRUS": (EICAR_NAME,)}


def test_signature_split_across_chunks_is_found(tmp_path: Path, clamd: ClamdServer) -> None:
    data = b"x" * 1000 + EICAR + b"y" * 5000  # EICAR straddles the 1024-byte chunk boundary
    res = scan(tmp_path, data, clamd.unix_address, chunk_bytes=1024)
    assert symbols(res) == {"CLAMAV_VIRUS": (EICAR_NAME,)}


def test_every_clamav_testfile_is_found(tmp_path: Path, clamd: ClamdServer) -> None:
    """Each of the 40 kept clamav-testfiles, raw and as a base64 attachment of a message."""
    assert len(SAMPLES) == 40, [p.name for p in SAMPLES]
    f = make(clamd.tcp_address)

    async def run() -> list[tuple[str, str, dict[str, tuple[str, ...]]]]:
        out = []
        for p in SAMPLES:
            raw = p.read_bytes()
            for how, data in (("raw", raw), ("attached", message([(p.name, raw)]))):
                res = await f.on_message(context(spool(tmp_path, data, f"{p.name}.{how}")))
                out.append((p.name, how, symbols(res)))
        return out

    results = asyncio.run(run())
    missed = [(name, how, syms) for name, how, syms in results
              if syms != {"CLAMAV_VIRUS": (TESTFILE_NAME,)}]
    assert missed == []
    assert len(results) == 80


def test_spamassassin_corpus_is_clean(tmp_path: Path, clamd: ClamdServer) -> None:
    files = sorted(SPAMASSASSIN.glob("ham/*")) + sorted(SPAMASSASSIN.glob("spam/*"))
    if not files:
        pytest.skip(f"SpamAssassin corpus not found at {SPAMASSASSIN}")
    f = make(clamd.unix_address)

    async def run() -> list[tuple[str, dict[str, tuple[str, ...]]]]:
        out = []
        for p in files:
            raw = p.read_bytes()
            if raw.startswith(b"From "):  # mbox separator line
                raw = raw.split(b"\n", 1)[1]
            res = await f.on_message(context(spool(tmp_path, crlf(raw))))
            out.append((p.name, symbols(res)))
        return out

    results = asyncio.run(run())
    assert len(results) == len(files) > 300
    assert [r for r in results if r[1] != {"CLAMAV_CLEAN": ()}] == []


def test_clean_message_has_no_verdict(tmp_path: Path, address: str) -> None:
    res = scan(tmp_path, message([("notes.txt", b"just text\n")]), address)
    assert symbols(res) == {"CLAMAV_CLEAN": ()}
    assert res.verdict is None and res.data["virus"] is None


@pytest.mark.parametrize("action,expected", [("quarantine", Action.QUARANTINE), ("none", None)])
def test_action_setting(tmp_path: Path, clamd: ClamdServer, action: str,
                        expected: Action | None) -> None:
    res = scan(tmp_path, EICAR, clamd.tcp_address, action=action)
    assert symbols(res) == {"CLAMAV_VIRUS": (EICAR_NAME,)}
    if expected is None:
        assert res.verdict is None
    else:
        assert res.verdict is not None and res.verdict.action is expected
        assert res.verdict.reply is None


def test_ping_and_version(clamd: ClamdServer) -> None:
    for addr in (clamd.tcp_address, clamd.unix_address):
        f = make(addr)
        assert asyncio.run(f.ping()) is True
        assert asyncio.run(f.version()).startswith("ClamAV 1.")
    assert asyncio.run(make(f"127.0.0.1:{free_port()}").ping()) is False


# -- failures ------------------------------------------------------------------------------------
def test_closed_port_raises(tmp_path: Path) -> None:
    with pytest.raises(ClamdError, match="cannot connect to clamd at tcp:127.0.0.1:"):
        scan(tmp_path, EICAR, f"tcp:127.0.0.1:{free_port()}")


def test_missing_socket_raises(tmp_path: Path) -> None:
    with pytest.raises(ClamdError, match="cannot connect to clamd at unix:.*nosuch.sock"):
        scan(tmp_path, EICAR, f"unix:{tmp_path}/nosuch.sock")


def test_hung_clamd_times_out_within_scan_timeout(tmp_path: Path) -> None:
    with HangingServer() as hung:
        start = time.monotonic()
        with pytest.raises(ClamdError, match="no complete scan reply within 0.5s"):
            scan(tmp_path, message([("a.bin", b"z" * 200_000)]), hung.address,
                 scan_timeout_s=0.5)
        elapsed = time.monotonic() - start
        assert hung.accepted == 1
    assert 0.45 <= elapsed < 1.5, elapsed


async def _fake_clamd(reply: bytes, data: bytes, tmp_path: Path, early: bool,
                      **cfg: Any) -> Result:
    """Scan ``data`` against a server that answers ``reply`` and closes: after reading the
    whole INSTREAM, or (``early``) at once."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not early:
            assert await reader.readexactly(10) == b"zINSTREAM\0"
            while n := struct.unpack("!I", await reader.readexactly(4))[0]:
                await reader.readexactly(n)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        f = make(f"127.0.0.1:{port}", **cfg)
        return await f.on_message(context(spool(tmp_path, data)))
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("reply,early,match", [
    (b"stream: Something odd\0", False, "unexpected clamd reply 'stream: Something odd'"),
    (b"UNKNOWN COMMAND\0", False, "unexpected clamd reply"),
    (b"stream: OK", False, "closed the connection"),  # no terminating NUL
    (b"x" * 10000 + b"\0", False, "reply too long"),
    # 1 MiB in 1 KiB chunks: the fake answers long before the stream is sent; an early
    # "stream: OK" must never be taken as a clean verdict
    (b"stream: OK\0", True, "replied before the end of the stream"),
])
def test_bad_replies_raise(tmp_path: Path, reply: bytes, early: bool, match: str) -> None:
    data = b"a" * MiB if early else EICAR
    with pytest.raises(ClamdError, match=match):
        asyncio.run(_fake_clamd(reply, data, tmp_path, early, chunk_bytes=1024))


def test_fake_clamd_ok_after_the_whole_stream_is_clean(tmp_path: Path) -> None:
    """The control for the cases above: the same fake, answering properly."""
    res = asyncio.run(_fake_clamd(b"stream: OK\0", b"a" * MiB, tmp_path, False,
                                  chunk_bytes=1024))
    assert symbols(res) == {"CLAMAV_CLEAN": ()}


# -- the size cap --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_clamd() -> Iterator[ClamdServer]:
    """A clamd whose StreamMaxLength is 1 MiB (its own: short temp path for the socket)."""
    with tempfile.TemporaryDirectory(prefix="mailgate-clamd1m-") as d, \
            ClamdServer(Path(d), stream_max_length="1M") as server:
        yield server


def test_oversize_message_scans_prefix_and_is_marked(tmp_path: Path,
                                                     small_clamd: ClamdServer) -> None:
    head = message([("eicar.com", EICAR)])
    padding = b"X-Pad: " + b"p" * 70 + b"\r\n"
    big = padding * (3 * MiB // len(padding)) + head  # 3 MiB: virus after the 1 MiB cap
    res = scan(tmp_path, big, small_clamd.tcp_address, stream_max_bytes=MiB)
    assert symbols(res) == {"CLAMAV_CLEAN": (), "CLAMAV_TRUNCATED": (str(len(big)),)}
    assert res.data["scanned_bytes"] == MiB and res.data["truncated"] is True
    # a virus inside the scanned prefix is found; clamd (1M limit) never refused the stream
    early = head + b"\r\n" + b"z" * (3 * MiB)
    res = scan(tmp_path, early, small_clamd.tcp_address, stream_max_bytes=MiB)
    assert symbols(res) == {"CLAMAV_VIRUS": (EICAR_NAME,), "CLAMAV_TRUNCATED": (str(len(early)),)}
    assert res.verdict is not None and res.verdict.action is Action.REJECT


def test_exactly_stream_max_bytes_is_not_truncated(tmp_path: Path,
                                                   small_clamd: ClamdServer) -> None:
    data = EICAR + b"\r\n" + b"q" * (MiB - len(EICAR) - 2)
    assert len(data) == MiB
    res = scan(tmp_path, data, small_clamd.unix_address, stream_max_bytes=MiB)
    assert symbols(res) == {"CLAMAV_VIRUS": (EICAR_NAME,)}


def test_stream_max_bytes_above_clamds_limit_is_an_error(tmp_path: Path,
                                                         small_clamd: ClamdServer) -> None:
    with pytest.raises(ClamdError, match="INSTREAM size limit exceeded"):
        scan(tmp_path, b"w" * (3 * MiB), small_clamd.tcp_address, stream_max_bytes=4 * MiB)


def test_file_chunks_reads_in_chunks_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes

    async def collect(limit: int) -> list[bytes]:
        return [c async for c in file_chunks(path, limit, 4096)]

    assert [len(c) for c in asyncio.run(collect(10_000))] == [4096, 4096, 1808]
    assert [len(c) for c in asyncio.run(collect(1 << 20))] == [4096, 4096, 2048]
    assert b"".join(asyncio.run(collect(5000))) == path.read_bytes()[:5000]


# -- settings and parsing ----------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("unix:/run/clamav/clamd.ctl", ClamdAddress(path="/run/clamav/clamd.ctl")),
    ("tcp:127.0.0.1:3310", ClamdAddress(host="127.0.0.1", port=3310)),
    ("127.0.0.1:3310", ClamdAddress(host="127.0.0.1", port=3310)),
    ("clamd.internal:3310", ClamdAddress(host="clamd.internal", port=3310)),
    ("tcp:[::1]:3310", ClamdAddress(host="::1", port=3310)),
    ("[2001:db8::5]:3310", ClamdAddress(host="2001:db8::5", port=3310)),
])
def test_address_forms(text: str, expected: ClamdAddress) -> None:
    assert ClamdAddress.parse(text) == expected
    assert ClamdAddress.parse(str(expected)) == expected


@pytest.mark.parametrize("cfg,key", [
    ({}, "address"),
    ({"address": "unix:relative.sock"}, "address"),
    ({"address": "unix:/" + "x" * 120}, "address"),
    ({"address": "127.0.0.1"}, "address"),
    ({"address": "::1:3310"}, "address"),
    ({"address": "127.0.0.1:0"}, "address"),
    ({"address": "127.0.0.1:70000"}, "address"),
    ({"address": 3310}, "address"),
    ({"address": "127.0.0.1:3310", "scan_timeout_s": 0}, "scan_timeout_s"),
    ({"address": "127.0.0.1:3310", "stream_max_bytes": 0}, "stream_max_bytes"),
    ({"address": "127.0.0.1:3310", "stream_max_bytes": "25M"}, "stream_max_bytes"),
    ({"address": "127.0.0.1:3310", "chunk_bytes": 100}, "chunk_bytes"),
    ({"address": "127.0.0.1:3310", "chunk_bytes": 32 * MiB}, "chunk_bytes"),
    ({"address": "127.0.0.1:3310", "action": "tempfail"}, "action"),
    ({"address": "127.0.0.1:3310", "timeout": 5}, "timeout"),
])
def test_bad_settings(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        ClamavFilter.from_config(cfg, Services())
    assert e.value.key == key


def test_defaults() -> None:
    f = ClamavFilter.from_config({"address": "127.0.0.1:3310"}, Services())
    assert (f.clamd.timeout_s, f.stream_max_bytes, f.clamd.chunk_bytes, f.action) == \
        (8.0, 25 * MiB, 65536, Action.REJECT)


@pytest.mark.parametrize("reply,name", [
    ("stream: OK", None),
    ("stream: Local.Test.EICAR-NDB.UNOFFICIAL FOUND", "Local.Test.EICAR-NDB.UNOFFICIAL"),
    ("stream: Bad\x07Na\r\nme FOUND", "Bad_Na__me"),
])
def test_parse_reply(reply: str, name: str | None) -> None:
    assert parse_reply(reply) == name


def test_clamd_client_reused_across_concurrent_scans(tmp_path: Path, clamd: ClamdServer) -> None:
    """One filter instance serves many connections at once."""
    client = Clamd(ClamdAddress.parse(clamd.tcp_address), 5.0, 4096)
    path = tmp_path / "e"
    path.write_bytes(EICAR)
    clean = tmp_path / "c"
    clean.write_bytes(b"nothing here\r\n" * 1000)

    async def run() -> list[str]:
        jobs = [client.instream(file_chunks(path if i % 2 else clean, 1 << 20, 4096))
                for i in range(20)]
        return await asyncio.gather(*jobs)

    replies = asyncio.run(run())
    assert replies == ["stream: OK", f"stream: {EICAR_NAME} FOUND"] * 10
