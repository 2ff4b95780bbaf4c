"""A raw SMTP client for the integration tests: send exact bytes, read exact replies.

It speaks no SMTP itself (no EHLO parsing, no dot-stuffing): tests write the bytes they mean and
check the replies they get. One convention throughout:

* ``reply()`` and ``cmd()`` return one complete reply as ``str``; the lines of a multi-line reply
  are joined with ``"\\n"`` (CRLF removed), e.g. ``"250-mx.gateway.test\\n250 8BITMIME"``.
* ``reply_lines()`` is the same reply as a list of lines.
* ``rest()`` reads to EOF and returns every remaining reply, in the same ``str`` form.
* ``greeting`` is the 220 reply read on connect (``greet=True``, the default), in the same form.

A reply ends at the first line whose fourth character is not ``-``. EOF in the middle of a reply
raises ``EOFError``. ``received`` holds every byte the server ever sent on this connection.
"""

from __future__ import annotations

import socket
import ssl


class RawSmtpClient:
    """A raw SMTP client socket, optionally upgraded to TLS in place (``starttls``)."""

    def __init__(self, address: tuple[str, int], *, source: str | None = None,
                 timeout: float = 10.0, greet: bool = True) -> None:
        self.sock: socket.socket = socket.create_connection(
            address, timeout, source_address=(source, 0) if source else None)
        self.sock.settimeout(timeout)
        self.buf = b""  # received, not yet parsed into replies
        self.received = bytearray()  # everything the server ever sent
        self.greeting = self.reply() if greet else ""  # "" when not read (greet=False)

    # -- sending ------------------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, line: str | bytes) -> str:
        """Send ``line`` + CRLF; return its whole reply (lines joined with ``"\\n"``)."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    # -- receiving ----------------------------------------------------------------------------

    def _recv(self, *, reset_ok: bool = False) -> bytes:
        """One read; b"" at EOF. A TLS-level EOF counts as EOF; a TCP reset only if
        ``reset_ok`` (otherwise ``ConnectionResetError`` propagates)."""
        try:
            chunk = self.sock.recv(65536)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        except ConnectionResetError:
            if not reset_ok:
                raise
            chunk = b""
        self.received += chunk
        return chunk

    def _line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self._recv()
            if not chunk:
                raise EOFError(f"connection closed in a reply; unparsed {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8")

    def reply_lines(self) -> list[str]:
        """One complete reply, as its lines (CRLF removed)."""
        lines: list[str] = []
        try:
            lines.append(self._line())
            while lines[-1][3:4] == "-":
                lines.append(self._line())
        except EOFError as e:
            raise EOFError(f"{e}; reply so far {lines!r}") from None
        return lines

    def reply(self) -> str:
        """One complete reply, its lines joined with ``"\\n"``."""
        return "\n".join(self.reply_lines())

    def rest(self, *, reset_ok: bool = False) -> list[str]:
        """Read to EOF, then return every reply still unread ([] when nothing more came).
        A partial reply before EOF raises ``EOFError``. With ``reset_ok`` a TCP reset counts as
        EOF; otherwise it raises ``ConnectionResetError``."""
        while chunk := self._recv(reset_ok=reset_ok):
            self.buf += chunk
        out = []
        while self.buf:
            out.append(self.reply())
        return out

    def until_closed(self, timeout: float) -> bytes:
        """Read until the server closes the connection (EOF or reset), with ``timeout`` for each
        read; return every byte not yet parsed. ``TimeoutError`` if it stays open."""
        self.sock.settimeout(timeout)
        got, self.buf = self.buf, b""
        try:
            while chunk := self._recv(reset_ok=True):
                got += chunk
        except TimeoutError:
            raise TimeoutError(f"connection still open after {timeout}s; got {got!r}") from None
        return got

    def closed(self, timeout: float = 3.0) -> bool:
        """True when the server closes the connection within ``timeout`` having sent nothing
        more; False if it stays open. AssertionError if it sent anything before closing."""
        try:
            extra = self.until_closed(timeout)
        except TimeoutError:
            return False
        assert not extra, f"unexpected data before close: {extra!r}"
        return True

    # -- TLS ----------------------------------------------------------------------------------

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        """TLS handshake on the socket, after the server's 220 to STARTTLS. Nothing may be
        buffered: AssertionError if the server sent anything after its 220 (that would be a
        plaintext reply to a command pipelined behind STARTTLS)."""
        assert self.buf == b"", f"plaintext after the 220 to STARTTLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    # -- life ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSmtpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
