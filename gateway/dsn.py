"""Delivery status notifications: decide whether one is wanted and build the RFC 3464 message.

The module is pure: it reads the original message, returns the DSN as bytes and never sends it.
The caller (the queue manager) sends the result from the null sender (``MAIL FROM:<>``) to
``DsnRequest.sender``; the bytes have CRLF line endings, no line over 998 octets and no
dot-stuffing. They are 7-bit unless the returned original or the sender's (SMTPUTF8) address
carries 8-bit octets: ``dsn.isascii()`` tells the relay whether BODY=8BITMIME (or SMTPUTF8,
when the sender address is not ASCII) is needed.

Choices where the RFCs leave room:

* NOTIFY absent (RFC 3461 4.1 allows FAILURE or FAILURE,DELAY): FAILURE only; delay warnings
  without an explicit NOTIFY=DELAY are opt-in (``wants_dsn(..., delay_by_default=True)``).
  SUCCESS covers ``delivered``, ``relayed`` and ``expanded``; which one a delivery owes, if
  any: ``success_action``. NEVER mixed with another keyword
  is a syntax error (RFC 3461 4.1) and raises.
* RET absent (RFC 3461 4.3 leaves it to the MTA): headers only. RET=FULL returns the whole
  message only in a DSN that reports a failure; delay and success reports carry the header.
  A message over ``max_original_bytes``, or with a line over 998 octets, is returned as its
  header only and the human-readable part says so (message/rfc822 with a replaced body would
  misrepresent the original's MIME structure).
* ENVID and ORCPT arrive xtext-decoded (as ``gateway.smtp.address.xtext_decode`` returns them)
  and are written decoded (RFC 3461 6.3 a, d). An ENVID that is not printable US-ASCII (which
  RFC 3461 4.4 forbids anyway) is written in its xtext form instead; a non-ASCII address is
  written as ``utf-8; <utf-8-addr-xtext>`` (RFC 6533).
* Values that come from peers (diagnostics, remote and client host names) are sanitized, never
  refused: controls and line breaks become spaces, non-ASCII becomes ``?``, ``=?`` is broken
  up (no encoded-words in DSN fields) and the field is cut to fit one line. Values that come
  from our own envelope (addresses, qid, host name) are validated and raise :class:`DsnError`.
* Dates are RFC 5322 ``date-time`` in UTC; ``Auto-Submitted: auto-replied`` (RFC 3834).
"""

from __future__ import annotations

import os
import re
import textwrap
import time
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import errors as email_errors
from email import policy as email_policy
from email.headerregistry import Address
from email.message import Message, MIMEPart
from email.utils import format_datetime, make_msgid
from typing import BinaryIO, Final, Literal

from gateway.errors import MailgateError
from gateway.smtp.address import xtext_encode

__all__ = [
    "DEFAULT_MAX_ORIGINAL_BYTES",
    "NOTIFY_KEYWORDS",
    "Action",
    "DsnError",
    "DsnRequest",
    "RecipientStatus",
    "build_dsn",
    "parse_notify",
    "success_action",
    "utf8_addr_xtext",
    "wants_dsn",
]

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

DEFAULT_MAX_ORIGINAL_BYTES: Final = 100_000
NOTIFY_KEYWORDS: Final = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
MAX_LINE: Final = 998  # RFC 5322 2.1.1, octets without CRLF
_FIELD_MAX: Final = 900  # a DSN field value is cut here: with its name the line fits MAX_LINE
_TEXT_MAX: Final = 600  # a value quoted in the human-readable part

# Per action: the NOTIFY keyword asking for it and the status classes it may carry (RFC 3464
# 2.3.3; "failed" after expiry of temporary errors is 4.x.x, a persistent transient failure).
_ACTIONS: Final[dict[str, tuple[str, str]]] = {
    "failed": ("FAILURE", "45"),
    "delayed": ("DELAY", "4"),
    "delivered": ("SUCCESS", "2"),
    "relayed": ("SUCCESS", "2"),
    "expanded": ("SUCCESS", "2"),
}
_SUBJECT: Final = (
    "Undelivered Mail Returned to Sender",
    "Delayed Mail (still being retried)",
    "Successful Mail Delivery Report",
)
_STATUS_RE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_TYPE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9-]*")  # address-, diagnostic-, mta-name-type
_HOST_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?")
_QID_RE: Final = re.compile(r"[A-Za-z0-9]{1,64}")
_BLANKS: Final = re.compile(r"[\x00-\x20\x7f]+")
_LINE_BREAK: Final = re.compile(rb"\r\n|\r|\n")
_UNSAFE_TEXT: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# Parts are built with 78-column folding and 7-bit transfer encodings; the whole message is
# written with a 998 limit so that DSN fields stay one line each and are never re-encoded.
_PART_POLICY: Final = email_policy.SMTP.clone(cte_type="7bit")
_WIRE: Final = email_policy.SMTP.clone(max_line_length=MAX_LINE)
_WIRE_UTF8: Final = email_policy.SMTPUTF8.clone(max_line_length=MAX_LINE)

# RFC 3463 section 3 for the details bounces carry most; otherwise the subject's name.
_STATUS_TEXT: Final[dict[str, str]] = {
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.6": "destination mailbox has moved, no forwarding address",
    "2.1": "mailbox disabled, not accepting messages",
    "2.2": "mailbox full",
    "2.3": "message length exceeds administrative limit",
    "3.4": "message too big for system",
    "4.1": "no answer from host",
    "4.4": "unable to route",
    "4.6": "routing loop detected",
    "4.7": "delivery time expired",
    "7.1": "delivery not authorized, message refused",
}
_SUBJECT_TEXT: Final = (
    "other|addressing|mailbox|mail system|network and routing|mail delivery protocol|"
    "message content or media|security or policy"
).split("|")
_HEADINGS: Final[dict[str, str]] = {
    "failed": "Delivery to these recipients failed; it will not be retried:",
    "delayed": "Delivery to these recipients is delayed; it is still being retried:",
    "delivered": "The message was delivered to these recipients:",
    "relayed": "The message was relayed to these recipients (no further reports will follow):",
    "expanded": "The message was delivered to these recipients and forwarded on from there:",
}


class DsnError(MailgateError, ValueError):
    """A DSN was asked for with data the gateway itself should never have produced."""


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What became of one recipient; one per-recipient block of the delivery-status part.

    ``recipient`` is the envelope address as delivered to (``Final-Recipient: rfc822; ...``).
    ``original_recipient`` is the ORCPT value as ``addr-type;address`` with the address already
    xtext-decoded (``"rfc822;bob@example.com"``), or None when the client sent no ORCPT.
    ``remote_mta`` is ``"dns; mx.example.com"`` or a bare host; ``diagnostic`` is
    ``"smtp; 550 5.1.1 user unknown"`` or the bare reply text (typed ``smtp``). Times are epoch
    seconds; ``will_retry_until`` belongs to ``delayed`` only.
    """

    recipient: str
    action: Action
    status: str
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None

    def __post_init__(self) -> None:
        _check_address(self.recipient, "recipient")
        if self.action not in _ACTIONS:
            raise DsnError(f"unknown DSN action {self.action!r}")
        if not _STATUS_RE.fullmatch(self.status):
            raise DsnError(f"not an RFC 3463 status code: {self.status!r}")
        if self.status[0] not in _ACTIONS[self.action][1]:
            raise DsnError(f"status {self.status} does not fit action {self.action}")
        if self.original_recipient is not None:
            addr_type, sep, address = self.original_recipient.partition(";")
            if not sep or not _TYPE_RE.fullmatch(addr_type.strip()):
                raise DsnError("original_recipient must be 'addr-type;address'")
            _check_address(address.strip(), "original recipient")
        if self.will_retry_until is not None and self.action != "delayed":
            raise DsnError("will_retry_until is only reported for delayed recipients")


@dataclass(frozen=True, slots=True, kw_only=True)
class DsnRequest:
    """What the queue knows about the message a DSN reports on.

    ``sender`` is the original envelope sender ("" for the null sender); ``envid`` the
    xtext-decoded ENVID; ``ret`` the RET parameter (None when absent); ``reporting_mta`` our
    host name; ``received_from_mta`` the client as ``"dns; host"`` or a bare host.
    """

    qid: str
    sender: str
    arrival: float
    envid: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None
    reporting_mta: str
    received_from_mta: str | None = None

    def __post_init__(self) -> None:
        if not _QID_RE.fullmatch(self.qid):
            raise DsnError(f"bad queue ID {self.qid!r}")
        if self.sender:
            _check_address(self.sender, "sender")
        if not _HOST_RE.fullmatch(self.reporting_mta):
            raise DsnError(f"bad reporting MTA host name {self.reporting_mta!r}")
        if self.ret not in (None, "FULL", "HDRS"):
            raise DsnError(f"bad RET value {self.ret!r}")
        if self.envid is not None and (not self.envid or _has_controls(self.envid)):
            raise DsnError("ENVID is empty or holds control characters")


def _token() -> str:
    """128 random bits in hex, for MIME boundaries (as ``secrets.token_hex(16)``, without
    loading ``secrets`` and its imports into every process)."""
    return os.urandom(16).hex()


def parse_notify(value: str) -> frozenset[str]:
    """Parse the RFC 3461 NOTIFY value (``NEVER`` or a comma list of SUCCESS, FAILURE, DELAY)."""
    if not value.isascii():
        raise DsnError("NOTIFY value is not ASCII")
    return _check_notify(frozenset(value.upper().split(",")))


def wants_dsn(
    sender: str, notify: frozenset[str] | None, action: str, *, delay_by_default: bool = False
) -> bool:
    """Whether a DSN with ``action`` is to be sent for a recipient with this NOTIFY.

    Never to the null sender; ``notify`` None means NOTIFY was absent, read as FAILURE (plus
    DELAY when ``delay_by_default``, the queue's opt-in for delay warnings).
    """
    if action not in _ACTIONS:
        raise DsnError(f"unknown DSN action {action!r}")
    keyword = _ACTIONS[action][0]
    if notify is not None:
        notify = _check_notify(frozenset(k.upper() for k in notify))
    if sender in ("", "<>"):
        return False
    if notify is None:
        return keyword == "FAILURE" or (keyword == "DELAY" and delay_by_default)
    return keyword in notify


def success_action(kind: str, extensions: Collection[str]) -> Action | None:
    """The action of the success report we owe for a delivery over a transport of ``kind``
    ("smtp", "mx", "lmtp", "maildir") to a server that announced ``extensions``; None when the
    downstream took the request over (RFC 3461 §5.2.1: it offers DSN, so it got NOTIFY,
    ORCPT, RET and ENVID and reports success itself). One that does not cannot be asked:
    ``relayed`` for SMTP (§5.2.2: the message left for an environment that sends no further
    reports), ``delivered`` for a Maildir or an LMTP server (§5.2.3, local delivery; the
    actions of RFC 3464 §2.3.3)."""
    if kind == "maildir":
        return "delivered"
    if "DSN" in extensions:
        return None
    return "delivered" if kind == "lmtp" else "relayed"


def build_dsn(
    req: DsnRequest,
    statuses: Sequence[RecipientStatus],
    original: BinaryIO | bytes,
    *,
    now: float | None = None,
    max_original_bytes: int = DEFAULT_MAX_ORIGINAL_BYTES,
    postmaster: str | None = None,
) -> bytes:
    """The complete DSN (multipart/report; report-type=delivery-status) as bytes.

    ``original`` is the message as spooled (any line endings), read from its current position
    and never beyond ``max_original_bytes + 1`` octets. ``postmaster`` is the From address,
    ``MAILER-DAEMON@<reporting_mta>`` by default.
    """
    if req.sender in ("", "<>"):
        raise DsnError("a DSN is never sent to the null sender")
    if not statuses:
        raise DsnError("a DSN needs at least one recipient status")
    if max_original_bytes < 0:
        raise DsnError("max_original_bytes must not be negative")
    when = time.time() if now is None else now
    from_addr = postmaster or f"MAILER-DAEMON@{req.reporting_mta}"
    actions = {s.action for s in statuses}
    failed = "failed" in actions
    returned = _returned(original, full=req.ret == "FULL" and failed, limit=max_original_bytes)

    msg = MIMEPart(policy=_PART_POLICY)
    msg["From"] = _address("Mail Delivery System", from_addr, "postmaster")
    msg["To"] = _address("", req.sender, "sender")
    msg["Subject"] = _SUBJECT[0 if failed else 1 if "delayed" in actions else 2]
    msg["Date"] = _date(when)
    msg["Message-ID"] = make_msgid(idstring=req.qid, domain=req.reporting_mta)
    msg["MIME-Version"] = "1.0"
    msg["Auto-Submitted"] = "auto-replied"
    msg.add_header("Content-Type", "multipart/report", report_type="delivery-status")
    msg.preamble = "This is a MIME-encapsulated message."

    text = MIMEPart(policy=_PART_POLICY)
    text.set_content(_human_text(req, statuses, returned))
    msg.attach(text)
    msg.attach(_status_part(req, statuses))
    if returned.part is not None:
        msg.attach(returned.part)
    # A random boundary cannot be guessed by peers; only the returned original is checked.
    boundary = "=_mailgate_" + _token()
    while boundary.encode("ascii") in returned.data:
        boundary = "=_mailgate_" + _token()
    msg.set_boundary(boundary)
    ascii_only = req.sender.isascii() and from_addr.isascii()
    wire = msg.as_bytes(policy=_WIRE if ascii_only else _WIRE_UTF8)
    if returned.part is None:
        return wire
    return wire.replace(returned.token, returned.data, 1)


# --- the delivery-status part ------------------------------------------------------------------


def _status_part(req: DsnRequest, statuses: Sequence[RecipientStatus]) -> MIMEPart:
    per_message: list[tuple[str, str]] = []
    if req.envid is not None:
        envid = req.envid if _printable_ascii(req.envid) else xtext_encode(req.envid)
        per_message.append(("Original-Envelope-Id", envid))
    per_message.append(("Reporting-MTA", f"dns; {req.reporting_mta}"))
    if req.received_from_mta:
        per_message.append(("Received-From-MTA", _typed(req.received_from_mta, "dns")))
    per_message.append(("Arrival-Date", _date(req.arrival)))
    per_message.append(("X-Mailgate-Queue-ID", req.qid))
    blocks: list[Message[str, str] | str] = [_fields(per_message)]
    for st in statuses:
        fields: list[tuple[str, str]] = []
        if st.original_recipient is not None:
            addr_type, _, address = st.original_recipient.partition(";")
            fields.append(("Original-Recipient", _address_field(addr_type, address)))
        fields.append(("Final-Recipient", _address_field("rfc822", st.recipient)))
        fields.append(("Action", st.action))
        fields.append(("Status", st.status))
        if st.remote_mta:
            fields.append(("Remote-MTA", _typed(st.remote_mta, "dns")))
        if st.diagnostic:
            fields.append(("Diagnostic-Code", _typed(st.diagnostic, "smtp")))
        if st.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(st.last_attempt)))
        if st.will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(st.will_retry_until)))
        blocks.append(_fields(fields))
    part = MIMEPart(policy=_PART_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _fields(pairs: list[tuple[str, str]]) -> Message[str, str]:
    # A compat32 Message stores values verbatim: they are written as given (already sanitized,
    # one line each) and never parsed for encoded-words or refolded.
    block = Message()
    for name, value in pairs:
        block[name] = value if len(value) <= _FIELD_MAX else value[: _FIELD_MAX - 3] + "..."
    return block


def _typed(value: str, default_type: str) -> str:
    """``type; text`` for Remote-MTA, Received-From-MTA and Diagnostic-Code, sanitized."""
    clean = _field_text(value)
    kind, sep, rest = clean.partition(";")
    if sep and _TYPE_RE.fullmatch(kind.strip()):
        return f"{kind.strip()}; {rest.strip()}"
    return f"{default_type}; {clean}"


def _address_field(addr_type: str, address: str) -> str:
    address = address.strip()
    if _printable_ascii(address) and addr_type.strip().lower() != "utf-8":
        return f"{addr_type.strip()}; {address}"
    return f"utf-8; {utf8_addr_xtext(address)}"


def utf8_addr_xtext(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext of a decoded address: QCHAR (printable ASCII but ``+``, ``=``
    and ``\\``) as is, everything else as ``\\x{HEX}``. The form of a ``utf-8`` address type in
    message/delivery-status and in ORCPT (valid with or without SMTPUTF8)."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}" for ch in address
    )


def _field_text(value: str) -> str:
    text = "".join(ch if ch.isascii() else "?" for ch in value)
    return _BLANKS.sub(" ", text).strip().replace("=?", "= ?")


# --- the returned original ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Returned:
    what: str  # for the human-readable part
    part: MIMEPart | None = None
    token: bytes = b""  # the placeholder in ``part`` ...
    data: bytes = b""  # ... for these octets, which the boundary must not occur in


def _returned(original: BinaryIO | bytes, *, full: bool, limit: int) -> _Returned:
    raw, whole = _read(original, limit, headers_only=not full)
    lines = _LINE_BREAK.split(raw)
    if not whole or lines[-1] == b"":
        lines.pop()  # a cut-off line, or the empty string after the final line break
    if not lines:
        return _Returned("The original message is not available.")
    blank = lines.index(b"") if b"" in lines else len(lines)
    head = [line[:MAX_LINE] for line in lines[:blank]]
    note = ""
    if full and not whole:
        note = f" The message is larger than {limit} bytes, so only its header is returned."
    elif full and any(len(line) > MAX_LINE for line in lines):
        note = " The message has lines over 998 characters, so only its header is returned."
    elif full:
        data = b"\r\n".join(lines) + b"\r\n"
        return _raw_part("message", "rfc822", data, "The message is attached.")
    if blank == len(lines) and not whole:
        note += " Its header was cut short."
    if not head:
        return _Returned("The original message is not available." + note)
    data = b"\r\n".join(head) + b"\r\n"
    return _raw_part("text", "rfc822-headers", data, "The message's header is attached." + note)


def _read(original: BinaryIO | bytes, limit: int, *, headers_only: bool) -> tuple[bytes, bool]:
    """Up to ``limit`` octets and whether that is the whole message.

    With ``headers_only`` a stream is read no further than the chunk that ends the header.
    """
    if isinstance(original, bytes | bytearray | memoryview):
        data = bytes(original[: limit + 1])
        return data[:limit], len(data) <= limit
    chunks: list[bytes] = []
    size = 0
    tail = b""  # the last octets before ``chunk``: a blank line is at most 4 octets long
    while size <= limit:
        chunk = original.read(min(65536, limit + 1 - size))
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        window = tail + chunk
        # A LF whose CR fell off the window still stands for that one line break.
        if headers_only and b"\n\n" in _LINE_BREAK.sub(b"\n", window):
            break
        tail = window[-3:]
    return b"".join(chunks)[:limit], False


def _raw_part(maintype: str, subtype: str, data: bytes, what: str) -> _Returned:
    """A part for ``data`` (CRLF already, 8-bit octets kept) and the placeholder it holds.

    The generator re-encodes or refuses 8-bit payloads, so the part carries a random token
    that :func:`build_dsn` replaces with ``data`` byte for byte after generation.
    """
    part = MIMEPart(policy=_PART_POLICY)
    params = ""
    if maintype == "text" and not data.isascii():
        params = "; charset=" + ("utf-8" if _is_utf8(data) else "unknown-8bit")
    part["Content-Type"] = f"{maintype}/{subtype}{params}"
    part["Content-Transfer-Encoding"] = "7bit" if data.isascii() else "8bit"
    token = "=_mailgate_original_" + _token()
    part.set_payload(token)
    return _Returned(what, part, token.encode("ascii"), data)


# --- the human-readable part -------------------------------------------------------------------


def _human_text(req: DsnRequest, statuses: Sequence[RecipientStatus], ret: _Returned) -> str:
    actions = [s.action for s in statuses]
    if "failed" in actions:
        intro = "Your message could not be delivered to one or more of its recipients."
    elif "delayed" in actions:
        intro = (
            "Your message has not been delivered yet. The mail system keeps trying; you do "
            "not need to send it again."
        )
    else:
        intro = "This is a delivery report for your message, as you asked for one."
    arrival = _date(req.arrival)
    received = f"Received: {arrival}"
    if req.received_from_mta:
        received += f" from {_display(_untyped(req.received_from_mta))}"
    out = [
        f"This is the mail system at host {req.reporting_mta}.",
        "",
        _wrap(intro),
        "",
        f"Queue ID: {req.qid}",
        _wrap(received),
    ]
    for action in _ACTIONS:
        group = [s for s in statuses if s.action == action]
        if group:
            out += ["", _wrap(_HEADINGS[action]), ""]
            out += [line for s in group for line in _describe(s)]
    out += ["", _wrap(ret.what.strip())]
    return "\n".join(out) + "\n"


def _describe(st: RecipientStatus) -> list[str]:
    _, subject, detail = st.status.split(".")
    meaning = _STATUS_TEXT.get(f"{int(subject)}.{int(detail)}")
    if meaning is None:
        meaning = (_SUBJECT_TEXT[int(subject)] if int(subject) < 8 else "other") + " status"
    lines = [f"  <{_display(st.recipient)}>", f"    Status: {st.status} ({meaning})"]
    if st.original_recipient is not None:
        original = st.original_recipient.partition(";")[2].strip()
        lines.append(f"    Originally addressed to: {_display(original)}")
    if st.remote_mta:
        lines.append(f"    Remote server: {_display(_untyped(st.remote_mta))}")
    if st.diagnostic:
        lines.append(_wrap(f"Reason: {_display(_untyped(st.diagnostic))}", indent="    "))
    if st.last_attempt is not None:
        lines.append(f"    Last attempt: {_date(st.last_attempt)}")
    if st.will_retry_until is not None:
        until = _date(st.will_retry_until)
        lines.append(f"    Will retry until: {until}")
    return lines


def _untyped(value: str) -> str:
    """``mx.example.com`` for ``dns; mx.example.com``."""
    kind, sep, rest = value.partition(";")
    return rest if sep and _TYPE_RE.fullmatch(kind.strip()) else value


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(
        text,
        width=76,
        initial_indent=indent,
        subsequent_indent=indent + "  " if indent else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _display(value: str) -> str:
    """Peer text made safe for the human-readable part: no controls, one line, bounded."""
    text = "".join(
        " " if unicodedata.category(ch) in _UNSAFE_TEXT or ch.isspace() else ch for ch in value
    )
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 3] + "..."


# --- helpers -----------------------------------------------------------------------------------


def _check_notify(keywords: frozenset[str]) -> frozenset[str]:
    if not keywords or not keywords <= NOTIFY_KEYWORDS:
        raise DsnError(f"bad NOTIFY keywords {sorted(keywords)}")
    if "NEVER" in keywords and len(keywords) > 1:
        raise DsnError("NOTIFY=NEVER cannot be combined with other keywords")
    return keywords


def acceptable_text(value: str) -> bool:
    """True when a DSN may carry ``value`` (an ORCPT address, an ENVID): non-blank, at most 512
    octets, no control, surrogate or line/paragraph-separator characters."""
    return (bool(value.strip()) and len(value.encode("utf-8", "surrogatepass")) <= 512
            and not _has_controls(value))


def _check_address(value: str, what: str) -> None:
    if not value or len(value.encode("utf-8", "surrogatepass")) > 512 or _has_controls(value):
        raise DsnError(f"bad {what} address {value!r}")


def _has_controls(value: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in value)


def _printable_ascii(value: str) -> bool:
    return all(" " <= ch <= "~" for ch in value)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _address(name: str, addr_spec: str, what: str) -> Address:
    try:
        return Address(display_name=name, addr_spec=addr_spec)
    except email_errors.NonASCIILocalPartDefect:  # SMTPUTF8 (RFC 6532): written as UTF-8
        local, _, domain = addr_spec.rpartition("@")
        if len(local) > 1 and local[0] == local[-1] == '"':
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError, email_errors.HeaderParseError) as exc:
        raise DsnError(f"bad {what} address {addr_spec!r}") from exc


def _date(timestamp: float) -> str:
    """RFC 5322 date-time, in UTC."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))
