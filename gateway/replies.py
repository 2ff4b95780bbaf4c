"""SMTP reply value objects: a code, an RFC 3463 enhanced status code and text.

Every reply mailgate sends is built here so that each one carries an enhanced status code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # enhanced status code, e.g. "5.1.1"
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP code {self.code}")
        if self.status and self.status[0] != str(self.code)[0]:
            raise ValueError(f"status {self.status} does not match code {self.code}")

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temp(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_perm(self) -> bool:
        return self.code >= 500

    def with_qid(self, qid: str) -> Reply:
        """The same reply with ``(qid)`` appended, as every reject/tempfail text ends."""
        return Reply(self.code, self.status, f"{self.text} ({qid})")

    def lines(self) -> list[str]:
        parts = self.text.split("\n") if self.text else [""]
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            body = f"{self.status} {part}" if self.status else part
            out.append(f"{self.code}{sep}{body}".rstrip())
        return out

    def render(self) -> str:
        """Wire form without the final CRLF (multi-line replies joined with CRLF)."""
        return "\r\n".join(self.lines())

    def __str__(self) -> str:
        return self.render()


# Common replies (RFC 5321 codes, RFC 3463 enhanced status codes).
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RCPT_OK = Reply(250, "2.1.5", "Recipient ok")
BYE = Reply(221, "2.0.0", "Bye")
SYNTAX = Reply(500, "5.5.2", "Syntax error, command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
INTERNAL = Reply(451, "4.3.0", "Internal error, try again later")
TOO_BUSY = Reply(421, "4.3.2", "Too many connections, try again later")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")
