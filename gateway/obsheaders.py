"""RFC 5322 §4.5.1 obsolete header syntax in the MIME parse: ``obs-optional`` allows white
space between a field name and its colon (``Content-Type : multipart/mixed``), and mail
clients read such a field. The stdlib's feed parser does not: its module-level ``headerRE``
takes the line for the first line of the body, so a message (or a part) written that way hid
its whole structure, attachments and file names from every filter while the recipient's
client showed them.

:class:`ObsBytesFeedParser` is the stdlib's ``BytesFeedParser`` whose ``_parsegen`` (the
header/body state machine, recursive per part) runs with a ``headerRE`` that accepts the
obsolete form; the stdlib module itself is left as it is, so only the gateway's MIME view
reads this way. The white space is then taken off the name by the parse's policy
(:data:`POLICY`: compat32 whose ``header_source_parse`` strips it, a public extension point).

That ``_parsegen`` still reads the module global ``headerRE`` with its known pattern is checked
once per process (patch ``email.feedparser-obs-wsp``, gateway/patches.py), and a known message
must parse as expected; otherwise the stdlib's parser is used as it is (the obsolete form then
stays unread) and the registry logs its one warning.
"""

from __future__ import annotations

import email.feedparser
import email.message
import email.policy
import re
import types
from typing import Any

from gateway import patches

PATCH = "email.feedparser-obs-wsp"
STDLIB_PATTERN = r"^(From |[\041-\071\073-\176]*:|[\t ])"
OBS_HEADER_RE = re.compile(r"^(From |[\041-\071\073-\176]*[ \t]*:|[\t ])")


class _Compat32Obs(email.policy.Compat32):
    """compat32, the field name read without the white space before its colon."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name.rstrip(" \t"), value


POLICY = _Compat32Obs()


def _obs_parsegen() -> Any:
    stdlib = email.feedparser.FeedParser._parsegen  # type: ignore[attr-defined]
    namespace = {**vars(email.feedparser), "headerRE": OBS_HEADER_RE}
    return types.FunctionType(stdlib.__code__, namespace, stdlib.__name__,
                              stdlib.__defaults__, stdlib.__closure__)


class ObsBytesFeedParser(email.feedparser.BytesFeedParser):
    """The stdlib's bytes feed parser, reading ``Name WSP :`` as a header field."""


def check() -> str | None:
    """None when the stdlib's parser reads its header lines as this module assumes."""
    stdlib = getattr(email.feedparser.FeedParser, "_parsegen", None)
    if stdlib is None or "headerRE" not in stdlib.__code__.co_names:
        return "FeedParser._parsegen no longer reads the module's headerRE"
    stdlib_re = getattr(email.feedparser, "headerRE", None)
    if stdlib_re is None or stdlib_re.pattern != STDLIB_PATTERN:
        return "email.feedparser.headerRE has another pattern"
    parser = email.feedparser.BytesFeedParser(policy=POLICY)
    parser._parsegen = types.MethodType(_obs_parsegen(), parser)  # type: ignore[attr-defined]
    parser._parse = parser._parsegen().__next__  # type: ignore[attr-defined]
    parser.feed(b"Subject: s\r\nContent-Type : multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                b"Content-Type\t: text/html\r\n\r\n<p>x</p>\r\n--b--\r\nNote : body\r\n")
    msg = parser.close()
    got = [(k, v) for k, v in msg.items()]
    part = msg.get_payload(0) if msg.is_multipart() else None
    if got != [("Subject", "s"), ("Content-Type", "multipart/mixed; boundary=b")] or \
            not isinstance(part, email.message.Message) or \
            part.get_content_type() != "text/html" or msg.epilogue != "Note : body\r\n":
        return f"a known message parsed as {got!r}"
    return None


def _apply() -> None:
    ObsBytesFeedParser._parsegen = _obs_parsegen()  # type: ignore[attr-defined]


patches.install(PATCH, check, _apply)
