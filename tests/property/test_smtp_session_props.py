"""The SMTP command line through a real gateway (a process on loopback, proxy mode to a real
sink): whatever line a client sends — MAIL and RCPT with generated paths and parameters,
unknown verbs, lower case, NUL bytes, non-UTF-8 bytes, bare CR, over-long lines — every answer
is a proper SMTP reply: three digits, the right separator on each line of a multi-line reply,
and an RFC 3463 enhanced status code whose class matches the reply (ENHANCEDSTATUSCODES is
offered, RFC 2034 §3). The gateway never drops the client without a reply, and stays up."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.property import PROPS
from tests.property.test_smtp_address_props import params, paths
from tests.support.gateway import GatewayProcess, base_policy
from tests.support.sink import Sink

REPLY_LINE = re.compile(rb"(\d{3})([ -])(.*)")
ENHANCED = re.compile(rb"([245])\.\d{1,3}\.\d{1,3}(?: |$)")


class Client:
    """One SMTP connection, re-opened when the server closes it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.buf = b""

    def open(self) -> None:
        self.close()
        self.sock = socket.create_connection(self.address, timeout=20)
        self.buf = b""
        greeting = self.reply()
        assert greeting[0][0] == b"220", greeting
        self.send(b"EHLO client.example.org\r\n")
        lines = self.reply()
        assert lines[-1][0] == b"250" and any(b"ENHANCEDSTATUSCODES" in t for _, _, t in lines)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def reply(self) -> list[tuple[bytes, bytes, bytes]]:
        """One whole reply (every line checked), or [] when the server closed at once."""
        out: list[tuple[bytes, bytes, bytes]] = []
        while True:
            while b"\r\n" not in self.buf:
                assert self.sock is not None
                chunk = self.sock.recv(65536)
                if not chunk:
                    assert not self.buf, self.buf
                    return out
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            m = REPLY_LINE.fullmatch(line)
            assert m, line
            out.append((m.group(1), m.group(2), m.group(3)))
            if m.group(2) == b" ":
                codes = {c for c, _, _ in out}
                assert len(codes) == 1, out
                return out


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    with Sink() as sink:
        policy = base_policy(downstream=f"smtp://127.0.0.1:{sink.port}",
                             filters=[{"name": "rcpt", "recipients": ["@example.test"]}])
        with GatewayProcess(tmp_path_factory.mktemp("gw"), policy) as gw:
            yield Client(gw.address)


verbs = st.sampled_from(["MAIL FROM:", "mail from:", "RCPT TO:", "rcpt to:", "MAIL", "RCPT",
                         "MAIL FROM: ", "RCPT TO:  ", "NOOP", "VRFY", "EXPN", "HELP", "FOO",
                         "RSET", "DATA ", "STARTTLS x", "AUTH PLAIN", "BDAT 1", "ETRN x", ""])
raw_bits = st.sampled_from([b"", b"\x00", b"\xff\xfe", b"\xc3\x28", b"\r", b" \t", b"\x1b[1m",
                            b"\xe2\x80\xa8", "é".encode(), b"<", b">", b"x" * 600])


@st.composite
def lines(draw: Any) -> bytes:
    text = draw(verbs) + draw(paths()) + " " + draw(params)
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8 on the wire
    for _ in range(draw(st.integers(0, 1))):
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(raw_bits) + data[i:]
    return data.replace(b"\n", b"") + b"\r\n"


@PROPS
@given(lines())
def test_every_command_line_gets_a_proper_reply(client: Client, line: bytes) -> None:
    client.open()  # a fresh session per example: examples stay independent
    try:
        if line[:4].upper() == b"RCPT" and line[4:5] != b"\x00":  # RCPT within a transaction
            client.send(b"MAIL FROM:<sender@example.org>\r\n")
            assert client.reply()[0][0] == b"250"
        client.send(line)
        reply = client.reply()
        assert reply, f"connection closed without a reply to {line!r}"
        code = reply[0][0]
        event(code.decode())
        for c, _, text in reply:
            m = ENHANCED.match(text)
            assert m and m.group(1)[:1] == c[:1], (line, reply)
        if code != b"421":  # else the server ends the session, as it says
            client.send(b"QUIT\r\n" if code != b"354" else b".\r\nQUIT\r\n")
            if code == b"354":
                assert client.reply()
            assert client.reply()[0][0] == b"221"
    finally:
        client.close()


def test_session_closed_after_421_said_so(client: Client) -> None:
    """Sanity of the harness: an ordinary session answers each step with a status code."""
    client.open()
    try:
        for cmd, want in [(b"MAIL FROM:<a@example.org>", b"250"),
                          (b"RCPT TO:<b@example.test>", b"250"),
                          (b"RCPT TO:<b@elsewhere.test>", b"5"), (b"RSET", b"250")]:
            client.send(cmd + b"\r\n")
            reply = client.reply()
            assert reply[0][0].startswith(want) and ENHANCED.match(reply[0][2]), reply
    finally:
        client.close()
