"""The queue's values: a queued message's metadata (``QueueEntry``) and its recipients, their
strict JSON form (format version 2; version 1, without ``skip``, is still read), and the spool's
error types. ``gateway.spool`` stores them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, cast

from gateway.errors import SpoolError
from gateway.qid import ALPHABET

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # 1: before ``skip`` (read as 0)
FREE_SPACE_FACTOR = 1.5  # MAIL gets 452 4.3.1 below this many times max_message_bytes free
Area = Literal["active", "deferred", "hold"]
QUEUE_AREAS: tuple[Area, ...] = ("active", "deferred", "hold")
_PRECEDENCE: tuple[Area, ...] = ("hold", "deferred", "active")  # which copy wins a duplicate
RecipientState = Literal["pending", "delivered", "failed"]
_STATES = ("pending", "delivered", "failed")
_META, _TMP = ".json", ".tmp"


class SpoolMissing(SpoolError):
    """No such message in the queue (never committed, or already removed)."""


class SpoolBusy(SpoolError):
    """Another process (or another claim in this one) owns the message."""


class SpoolCorrupt(SpoolError):
    """A metadata file cannot be parsed or does not match its name or data."""


def is_qid(name: str) -> bool:
    return len(name) == 16 and not name.strip(ALPHABET)  # strip leaves "" iff all are in it


def min_free_bytes(max_message_bytes: int) -> int:
    """The default free-space threshold for accepting MAIL."""
    return int(max_message_bytes * FREE_SPACE_FACTOR)


def _check_qid(qid: str) -> str:
    if not is_qid(qid):
        raise SpoolError(f"not a queue ID: {qid!r}")
    return qid


def _check_area(area: str) -> Area:
    if area not in QUEUE_AREAS:
        raise SpoolError(f"not a queue area: {area!r}")
    return cast(Area, area)


def _freeze(value: Any) -> Any:
    """JSON-shaped data, read-only: dicts become mapping proxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


class _ReadFromJson(dict[str, Any]):
    """A decision as ``json.loads`` made it: ``__post_init__`` need not normalise it through
    JSON again (it still freezes it)."""


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# json.dumps with options builds its encoder per call: these run for every message
_encode_decision = json.JSONEncoder(default=_thaw).encode
_encode_entry = json.JSONEncoder(default=_thaw, separators=(",", ":")).encode


@dataclass(frozen=True, kw_only=True)
class Recipient:
    addr: str
    notify: frozenset[str] | None = None  # DSN NOTIFY=; None when the client gave none
    orcpt: str | None = None  # DSN ORCPT=, decoded (addr-type;address)
    state: RecipientState = "pending"
    last_reply: str | None = None
    attempts: int = 0
    remote_mta: str | None = None  # the server that gave last_reply (a DSN's Remote-MTA)

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise ValueError(f"recipient state {self.state!r}")
        if self.attempts < 0:
            raise ValueError("recipient attempts < 0")

    def to_obj(self) -> dict[str, Any]:
        return {**vars(self), "notify": None if self.notify is None else sorted(self.notify)}

    @classmethod
    def from_obj(cls, obj: Any) -> Recipient:
        notify = _opt(obj, "notify", list)
        if notify is not None and not all(isinstance(n, str) for n in notify):
            raise ValueError("notify: not a list of strings")
        return cls(addr=_req(obj, "addr", str),
                   notify=None if notify is None else frozenset(notify),
                   orcpt=_opt(obj, "orcpt", str), state=_req(obj, "state", str),
                   last_reply=_opt(obj, "last_reply", str), attempts=_req(obj, "attempts", int),
                   remote_mta=_opt(obj, "remote_mta", str))


@dataclass(frozen=True, kw_only=True)
class QueueEntry:
    """Everything the queue keeps about one message besides its bytes (``data/<qid>``)."""

    qid: str
    sender: str  # "" is the null reverse-path
    mail_params: tuple[str, ...] = ()  # MAIL FROM ESMTP parameters, as received
    envid: str | None = None  # DSN ENVID=
    ret: str | None = None  # DSN RET= (FULL / HDRS)
    recipients: tuple[Recipient, ...]
    arrival: float
    size: int  # bytes in data/<qid>
    prepend: bytes = b""  # header lines (CRLF-terminated) to put before the data when relaying
    # Bytes at the start of data/<qid> that are not relayed: the received header block that
    # ``prepend`` replaces (the gateway's edited copy of it). The data file is the message as
    # received; what leaves is ``prepend`` + data[skip:] (see ``Spool.open_outgoing``).
    skip: int = 0
    decision: Mapping[str, Any] = field(default_factory=dict)  # action, score, by, symbols...
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    client_ip: str = ""
    helo: str = ""
    delay_warned: float | None = None  # when the delay DSN was sent (once per message)

    def __post_init__(self) -> None:
        if not is_qid(self.qid):
            raise ValueError(f"not a queue ID: {self.qid!r}")
        if not self.recipients:
            raise ValueError("a queue entry needs at least one recipient")
        if self.size < 0 or self.attempts < 0:
            raise ValueError("size and attempts must be >= 0")
        if not 0 <= self.skip <= self.size:
            raise ValueError(f"skip must be within 0..size ({self.size}), not {self.skip}")
        # Normalised through JSON now, so a loaded entry equals the one committed, and a value
        # JSON cannot hold fails here rather than at commit time.
        decision = self.decision
        if type(decision) is not _ReadFromJson:  # that one is JSON's own output already
            decision = json.loads(_encode_decision(decision))
        object.__setattr__(self, "decision", _freeze(decision))
        object.__setattr__(self, "mail_params", tuple(self.mail_params))
        object.__setattr__(self, "recipients", tuple(self.recipients))

    @property
    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.state == "pending")

    @property
    def done(self) -> bool:
        """No recipient left to try: the message can be removed (after any DSN)."""
        return not self.pending

    def with_recipient_results(
            self, results: Mapping[str, tuple[RecipientState, str | None]],
            remote_mta: str | None = None) -> QueueEntry:
        """Record one delivery attempt's outcome per address: ``{addr: (state, reply)}``.
        ``"pending"`` means a temporary failure. Each listed pending recipient gets one more
        attempt counted; naming an unknown or already final recipient is a ValueError.
        ``remote_mta``: the server that gave these replies (None: none did, or our own)."""
        if not results:
            return self
        pending = {r.addr for r in self.pending}
        for addr in results:
            if addr not in pending:
                raise ValueError(f"{addr!r} is not a pending recipient of {self.qid}")
        out = []
        for r in self.recipients:
            if r.state == "pending" and r.addr in results:
                state, reply = results[r.addr]
                r = Recipient(addr=r.addr, notify=r.notify, orcpt=r.orcpt, state=state,
                              last_reply=reply, attempts=r.attempts + 1, remote_mta=remote_mta)
            out.append(r)
        return self._with(recipients=tuple(out))

    def with_retry(self, next_attempt: float, error: str | None) -> QueueEntry:
        """One more attempt made; try again at ``next_attempt``."""
        return self._with(attempts=self.attempts + 1, next_attempt=next_attempt,
                          last_error=error)

    def _with(self, **changes: Any) -> QueueEntry:
        """``replace`` for changes that keep what ``__post_init__`` checks and normalises (the
        same recipients with new outcomes, one more attempt): the other fields are shared as
        they are, not normalised again — the decision's JSON round trip and freezing were most
        of the cost of a ``replace``, twice per delivered message."""
        new = object.__new__(QueueEntry)
        new.__dict__.update(self.__dict__, **changes)
        return new

    def to_json(self) -> str:
        """One JSON object: the fields, ``format``, and ``prepend`` in base64."""
        obj = {"format": FORMAT_VERSION, **{k: getattr(self, k) for k in _PLAIN},
               "mail_params": self.mail_params,
               "recipients": [r.to_obj() for r in self.recipients],
               "prepend": base64.b64encode(self.prepend).decode("ascii"), "skip": self.skip}
        return _encode_entry(obj)

    @classmethod
    def from_json(cls, text: str | bytes) -> QueueEntry:
        """Parse strictly; any problem is a SpoolCorrupt naming it."""
        try:
            obj = json.loads(text)
            if (version := _req(obj, "format", int)) not in _READABLE_VERSIONS:
                raise ValueError(f"unsupported format version {version}")
            params = _req(obj, "mail_params", list)
            if not all(isinstance(p, str) for p in params):
                raise ValueError("mail_params: not a list of strings")
            plain = {k: (_opt if optional else _req)(obj, k, kind)
                     for k, (kind, optional) in _PLAIN.items()}
            if type(plain.get("decision")) is dict:
                plain["decision"] = _ReadFromJson(plain["decision"])
            return cls(**plain, mail_params=tuple(params),
                       recipients=tuple(map(Recipient.from_obj, _req(obj, "recipients", list))),
                       prepend=base64.b64decode(_req(obj, "prepend", str), validate=True),
                       skip=_req(obj, "skip", int) if version >= 2 else 0)
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # binascii.Error too
            raise SpoolCorrupt(f"{type(e).__name__}: {e}") from None


# QueueEntry fields stored as plain JSON values: name -> (JSON type, may be null)
_PLAIN: dict[str, tuple[type, bool]] = {
    "qid": (str, False), "sender": (str, False), "envid": (str, True), "ret": (str, True),
    "arrival": (float, False), "size": (int, False), "decision": (dict, False),
    "attempts": (int, False), "next_attempt": (float, False), "last_error": (str, True),
    "client_ip": (str, False), "helo": (str, False), "delay_warned": (float, True)}


def _req(obj: Any, key: str, kind: type) -> Any:
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _opt(obj: Any, key: str, kind: type) -> Any:
    return None if isinstance(obj, dict) and obj.get(key) is None else _req(obj, key, kind)
