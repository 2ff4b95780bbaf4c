"""The filter contract: stages, symbols, edits, verdicts, results and the context a filter sees.

A filter implements only the hooks it needs (``async def on_rcpt(self, ctx) -> Result``) and
returns a frozen :class:`Result`. Filters report (symbols), the policy decides; a filter sets a
``verdict`` only for hard facts (an unknown recipient, a virus). Filters never touch the socket
and never mutate the message: they return :class:`AddHeader` / :class:`RemoveHeader` edits that
the core applies once, when the message is relayed.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import enum
import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from gateway.replies import Reply

if TYPE_CHECKING:
    from gateway.dnsresolver import Resolver
    from gateway.message import Message
    from gateway.services import Services
    from gateway.smtp.address import Address


class Stage(enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    MESSAGE = "message"

    @property
    def order(self) -> int:
        return _STAGE_ORDER[self]

    @property
    def hook(self) -> str:
        return f"on_{self.value}"


_STAGE_ORDER = {s: i for i, s in enumerate(Stage)}


class Action(enum.Enum):
    """What happens to a message. Declared from mildest to most severe."""

    ACCEPT = "accept"
    ADD_HEADER = "add_header"
    REWRITE_SUBJECT = "rewrite_subject"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _ACTION_ORDER[self]

    @property
    def refuses(self) -> bool:
        """True for the actions that answer the client with 4xx/5xx."""
        return self in (Action.TEMPFAIL, Action.REJECT)


_ACTION_ORDER = {a: i for i, a in enumerate(Action)}


@dataclass(frozen=True, slots=True)
class Symbol:
    """A named finding, e.g. ``Symbol("SPF_FAIL", ("-all",))``; the policy gives it a score.
    ``score`` is the filter's own suggestion (a rule file's ``score`` line, a score imported
    from spamd/rspamd, a Bayes probability band), used only when the policy's ``[scores]`` has
    no entry for the symbol: the policy always wins."""

    name: str
    options: tuple[str, ...] = ()
    score: float | None = None


_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str

    def __post_init__(self) -> None:
        if not _FIELD_NAME.fullmatch(self.name):
            raise ValueError(f"not a header field name: {self.name!r}")


@dataclass(frozen=True, slots=True)
class RemoveHeader:
    """Remove every header ``name`` (case-insensitive); with ``value_prefix``, only those whose
    value starts with it (e.g. forged Authentication-Results carrying our authserv-id); with
    ``name_prefix``, every header whose name starts with ``name`` (e.g. ``X-Spam-``)."""

    name: str
    value_prefix: str | None = None
    name_prefix: bool = False


Edit = AddHeader | RemoveHeader


@dataclass(frozen=True, slots=True)
class Verdict:
    """A hard decision from a filter. ``reply`` is optional: the core picks a standard one."""

    action: Action
    reply: Reply | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    symbols: tuple[Symbol, ...] = ()
    edits: tuple[Edit, ...] = ()
    verdict: Verdict | None = None
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not isinstance(self.data, MappingProxyType):
            object.__setattr__(self, "data", MappingProxyType(dict(self.data)))


EMPTY = Result()


@dataclass(frozen=True, slots=True)
class RecipientCoverage:
    """Which recipient domains a filter checks, declared by a filter that refuses unknown
    users (its ``recipient_coverage`` attribute or property): ``check-policy`` and the start of
    ``run`` warn about an accepted domain that no filter covers (every address there would be
    accepted) and about entries for domains that are not accepted (gateway/policy/lint.py)."""

    checked: frozenset[str] = frozenset()  # domains where an unlisted recipient is refused
    whole: frozenset[str] = frozenset()  # domains whose every address is accepted on purpose
    every_domain: bool = False  # checks every recipient, whatever its domain (a directory)

    def covers(self, domain: str) -> bool:
        return self.every_domain or domain in self.checked or domain in self.whole

    @property
    def named(self) -> frozenset[str]:
        """The domains the filter's own settings name."""
        return self.checked | self.whole


@dataclass(frozen=True, slots=True)
class Client:
    """The connected client as the filters see it."""

    ip: str
    port: int
    helo: str | None = None
    tls: bool = False
    trusted: bool = False  # inside policy.trusted_networks


@dataclass(frozen=True, slots=True)
class FilterContext:
    """Everything a filter may look at, as an immutable snapshot for one hook call."""

    stage: Stage
    qid: str
    client: Client
    sender: Address | None = None
    sender_params: Mapping[str, str | None] = field(default_factory=dict)
    recipients: tuple[Address, ...] = ()  # recipients accepted so far
    rcpt: Address | None = None  # the recipient being checked (rcpt stage)
    message: Message | None = None  # message stage only
    results: Mapping[str, Result] = field(default_factory=dict)  # earlier filters, by name
    policy_class: str = "default"
    # this message's DNS: the shared resolver behind [dns] max_queries_per_message
    # (gateway.dnsresolver.LimitedResolver); None outside a transaction or without a resolver
    dns: Resolver | None = None


class Filter:
    """Base class for filters (optional: any class with ``from_config`` and hooks works).

    Subclasses set ``name`` and may set ``requires`` (filters that must be in the chain and run
    first) and ``after`` (filters that run first *if* they are in the chain); they implement
    any of ``on_connect``, ``on_helo``, ``on_mail``, ``on_rcpt``, ``on_message``. Each hook
    takes a :class:`FilterContext` and returns a :class:`Result`.

    A filter may also implement the signing hook ``async def on_sign(self, ctx, header_block:
    bytes) -> tuple[AddHeader, ...]``: called once, after the decision, only for mail that will
    be relayed, with the final header block (trace headers, every edit, the subject rewrite,
    and the headers of the signers before it in the chain; CRLF line ends, no blank line).
    The headers it returns are put on top, their values kept as given (folding included), so
    a signature over them stays valid. DKIM signing and ARC sealing use it.

    And the hook ``async def on_decided(self, ctx, decided: Decided) -> None``: called after
    the message-stage decision of every message (refused ones too), in the background — it
    never delays the reply and cannot change the outcome; errors and overruns of
    ``timeout_s`` are only logged. Bayes auto-learning uses it.

    And ``def inactive_reason(self) -> str | None``: asked once when the gateway starts (and
    on a reload); a text means the filter runs but cannot give findings yet (Bayes below its
    training minimum), logged as a ``filter-inactive`` warning and named in ``listening``.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    # True: the hooks wait on nothing outside this process (no DNS, no sockets; a worker thread
    # is fine). The pipeline then runs the filter in its stage's own coroutine, after the other
    # filters' tasks started and one after another with the other local ones, rather than in a
    # task of its own: less state per message in flight. Concurrency with the rest is unchanged.
    local: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], services: Services) -> Filter:
        if cfg:
            key = next(iter(cfg))
            raise ConfigError(key, "unknown setting")
        return cls()


class ConfigError(Exception):
    """Raised by ``from_config`` for a bad setting; the loader adds the file and key path."""

    def __init__(self, key: str, reason: str,
                 more: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
        # further (key, reason) pairs found in the same check (every unknown setting at once)
        self.every: tuple[tuple[str, str], ...] = ((key, reason), *more)


def hooks_of(obj: object) -> tuple[Stage, ...]:
    """The stages an object implements a hook for."""
    return tuple(s for s in Stage if callable(getattr(obj, s.hook, None)))


@dataclass(frozen=True, slots=True)
class Decided:
    """What was decided for a message, for ``on_decided``."""

    action: Action
    score: float
    by: str  # "score", "rule:NAME", "filter:NAME", "threshold:…"
    scores: Mapping[str, float]  # every symbol's score, as the decision counted it


SIGN_HOOK = "on_sign"
DECIDED_HOOK = "on_decided"


def decides(obj: object) -> bool:
    """True when the object implements ``on_decided``."""
    return callable(getattr(obj, DECIDED_HOOK, None))


def is_local(obj: object) -> bool:
    """True when the object declares ``local = True`` (see :class:`Filter`)."""
    return getattr(obj, "local", False) is True


def signs(obj: object) -> bool:
    """True when the object implements the signing hook (``on_sign``)."""
    return callable(getattr(obj, SIGN_HOOK, None))


T = TypeVar("T")
# At or below this many bytes of input, CPU-bound filter work runs on the event loop itself.
INLINE_MAX_BYTES = 64 * 1024


async def offload(size: int, func: Callable[..., T], /, *args: Any) -> T:
    """Run CPU-bound ``func(*args)`` over an input of ``size`` bytes (usually the message's):
    on the event loop when it is small, in the process's one CPU thread when it is large, so
    the loop keeps serving other sessions during a long scan. Under load a thread trip
    (wake-up, GIL hand-offs) costs more than a small scan: measured on the full chain at
    4 KiB, inlining cut the CPU per message by about a fifth and the peak RSS by 13 MB.

    One thread, not a pool: the GIL lets only one of them run Python at a time anyway, and
    each thread of a pool held a message's parse, tokens and SQLite connection of its own.
    On the full chain at 20 sessions × 64 KiB the one thread cut the peak RSS from 56 to
    46 MB against ``asyncio.to_thread`` (its pool: 6 threads here), at the same msgs/s.
    Not for calls that wait on the network or on the loop (pyspf's DNS): those go to
    ``asyncio.to_thread``."""
    if size <= INLINE_MAX_BYTES:
        return func(*args)
    import asyncio  # here: the policy loader imports this module, and the supervisor
    # process (gateway.launch) loads policies without ever running an event loop

    call = functools.partial(contextvars.copy_context().run, func, *args)  # as to_thread
    return await asyncio.get_running_loop().run_in_executor(_cpu_thread(), call)


_CPU: list[concurrent.futures.ThreadPoolExecutor] = []


def _cpu_thread() -> concurrent.futures.ThreadPoolExecutor:
    if not _CPU:
        _CPU.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mailgate-cpu"))
    return _CPU[0]


os.register_at_fork(after_in_child=_CPU.clear)  # a forked child has no thread of its own
