"""Read one SMTP DATA phase off an ``asyncio.StreamReader``: find the real end of data, unstuff
dots, police bare CR/LF, size and line limits, and hand the content to a sink in block-sized pieces.

This is the SMTP-smuggling defence of the gateway, so the rules are exact:

End of data
    DATA ends only at the wire sequence ``<CRLF>.<CRLF>``; the line right after the DATA command
    counts as preceded by CRLF, so a DATA phase that is just ``.<CRLF>`` is an empty message.
    A CRLF on the wire is simply the two bytes CR LF (the pair cannot overlap itself), so the end
    is the first occurrence of ``\\r\\n.\\r\\n`` in the stream prefixed by a virtual ``\\r\\n``.
    ``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ``\\n.\\r\\n`` and friends never end DATA, in either
    mode. Nothing after the terminator is consumed (see *Pushback* below).

Bare line breaks
    A bare LF is an LF not preceded by CR; a bare CR is a CR not followed by LF.
    ``"reject"``: from the block in which the first one is seen nothing more is written; the data
    is read to the real terminator and the outcome is ``BARE_NEWLINE``.
    ``"normalize"``: every bare LF and every bare CR is written as CRLF (``\\r\\r\\n`` becomes
    ``\\r\\n\\r\\n``), so the output is CRLF-clean: every CR in it is followed by LF and every LF
    is preceded by CR. A line that starts after such a normalized break is treated as if the client
    had sent CRLF (the rule Postfix documents for bare LF under ``smtpd_forbid_bare_newline =
    normalize``; here bare CR gets it too): its leading dot is unstuffed like any other line's.
    The one difference from a real CRLF is that such a break never ends DATA: a lone ``.`` after
    it is an ordinary content line (unstuffed, hence empty), never a terminator.

Dot-unstuffing (RFC 5321 4.5.2)
    Every line that starts with ``.`` loses that first dot. "Line" means a line of the output:
    lines are separated by CRLF and, per the rule above, by bare CR and bare LF.

Statistics (identical whatever the block boundaries are)
    ``bare_lf``/``bare_cr`` count bare characters in the content (the terminator has none).
    ``longest_line`` is the longest output line in bytes without its line break, so a leading
    stuffed dot is not counted (RFC 5321 4.5.3.1.6: 998 octets plus CRLF). ``wire_bytes`` is
    everything consumed, terminator included. ``size`` is what was actually passed to
    ``write()``: the whole content for ``OK``; for any other status a prefix of it (the pieces
    written before the problem was seen), to be discarded by the caller.

Status priority
    The whole DATA phase is always read to its terminator and every condition is evaluated over
    all of it, so the status does not depend on where a problem sits or on block boundaries:
    ``BARE_NEWLINE`` (reject mode only) > ``TOO_BIG`` (content after unstuffing/normalizing larger
    than ``max_message_bytes``) > ``LINE_TOO_LONG`` (a line longer than ``max_line_bytes``) > ``OK``.
    Writing stops with the block in which the first problem is seen (that block is not written,
    so with ``TOO_BIG`` ``size`` never exceeds ``max_message_bytes``).

Speed and memory
    The reader is drained with ``reader.read(BLOCK_SIZE)``; each block is handled with C-speed
    bytes operations, never a per-byte or per-line Python loop: ``find`` for the terminator and
    line-initial dots, one ``split`` on CRLF (the only per-line work, in C: it yields the exact
    line lengths) and a ``join`` + memchr that proves the block free of bare CR/LF. Only blocks
    with line-initial dots or bare CR/LF pay for unstuffing or ``count``/``replace``.
    Between blocks only the last two processed bytes (look-behind) and at most two undecided bytes
    are carried: a trailing CR (is an LF next?) and a line-initial ``.`` or ``.<CR>`` (the start of
    the terminator?). Memory is therefore a few blocks whatever the input, including a line of
    unbounded length.

Pushback
    Reading in blocks means the block holding the terminator may also hold the next pipelined
    command, which the caller (aiosmtpd's command loop) reads with ``readuntil()`` on this same
    StreamReader. StreamReader has no public way to peek or to unread, and the caller's code
    cannot be pointed at a wrapper, so a ``PushbackReader`` would not help. The alternatives
    were: ``readuntil(b"\\r\\n.\\r\\n")`` with ``LimitOverrunError`` chunking (public API, bounded,
    but it cannot see the ``.<CRLF>`` that ends an empty message, nor a terminator whose first
    CRLF was already consumed, and fixing that needs byte-at-a-time reads an attacker can force
    forever); peeking at ``_buffer`` and waiting through ``_wait_for_data()`` (plus ``_eof``,
    ``_exception``: four private members); ``feed_data()`` (appends at the end, asserts after EOF). The chosen design reads
    with the public ``read()`` and, only when the terminator is found mid-block, puts the
    remainder back in front of the reader's private ``_buffer`` bytearray (:func:`_unread`):
    one private member, one place, no await in between, pinned by a unit test. The remainder is
    at most one block, so flow control is not disturbed. That member is checked before first
    use (patch ``asyncio.streamreader-unread``, gateway/patches.py): when a ``StreamReader`` has
    no such bytearray, or bytes put back do not come out first, DATA is read with the public
    ``readuntil(b"\\n")`` instead (a long line in limit-sized pieces), which never reads past
    the terminator's LF and so never has anything to put back: the same results, slower.

Timeouts
    Each read waits at most ``idle_timeout_s`` and never past ``deadline`` (a ``loop.time()``
    value); either expiry raises :class:`DataTimeout`. The client closing the connection before
    the terminator raises :class:`DataEOF`.

Minimum data rate
    With ``min_rate_bytes_per_s`` (Postfix's ``smtpd_min_data_rate`` with per-request
    deadlines): the DATA phase starts with ``rate_grace_s`` seconds of credit; time spent
    waiting for the client uses it up, every byte received earns ``1 / min_rate_bytes_per_s``
    seconds more, and never more than ``rate_grace_s`` is banked. When it runs out (mid-read:
    the read's timeout is the moment it would) :class:`DataTooSlow` is raised. So a client
    that stays above the floor is never cut, a stall longer than ``rate_grace_s`` is, and one
    averaging a fraction ``f`` of the floor is cut after about ``rate_grace_s / (1 - f)``.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway import patches
from gateway.deadline import Deadline
from gateway.errors import MailgateError

__all__ = [
    "BLOCK_SIZE",
    "DataEOF",
    "DataOutcome",
    "DataStatus",
    "DataTimeout",
    "DataTooSlow",
    "read_data",
]

BLOCK_SIZE = 65536
"""Bytes requested from the StreamReader per read."""

_TERM = b"\r\n.\r\n"
_CRLF = b"\r\n"
_CRLF_DOT = b"\r\n."
_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E
_BREAKS = (_CR, _LF)


class DataStatus(enum.Enum):
    """How a DATA phase ended; see the module docstring for the priority between them."""

    OK = "ok"
    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"
    BARE_NEWLINE = "bare_newline"


@dataclass(frozen=True, slots=True)
class DataOutcome:
    """The result of one DATA phase that reached its terminator."""

    status: DataStatus
    size: int  # bytes of content passed to write() (after unstuffing/normalizing)
    wire_bytes: int  # bytes consumed from the wire, terminator included
    bare_lf: int  # bare LF characters seen in the content
    bare_cr: int  # bare CR characters seen in the content
    longest_line: int  # longest content line in bytes, without line break or stuffed dot


class DataTimeout(MailgateError, TimeoutError):
    """The client was idle longer than ``idle_timeout_s`` or the DATA ``deadline`` passed."""


class DataTooSlow(DataTimeout):
    """The client sent its DATA more slowly than ``min_rate_bytes_per_s`` (see the module
    docstring): ``wire_bytes`` received in ``elapsed_s`` seconds."""

    def __init__(self, wire_bytes: int, elapsed_s: float, min_rate: int) -> None:
        super().__init__(f"DATA below {min_rate} bytes/s: {wire_bytes} bytes in "
                         f"{elapsed_s:.1f}s")
        self.wire_bytes = wire_bytes
        self.elapsed_s = elapsed_s


class DataEOF(MailgateError, ConnectionResetError, EOFError):
    """The client closed the connection before ``<CRLF>.<CRLF>``.

    A ``ConnectionResetError`` so that aiosmtpd's command loop treats it as a lost connection.
    """


class _Scanner:
    """The I/O-free DATA state machine: one call per wire block, state carried between calls."""

    __slots__ = (
        "_ctx", "_carry", "_line", "_max_size", "_max_line", "_reject",
        "size", "written", "wire", "bare_lf", "bare_cr", "longest", "bare", "too_big",
        "too_long",
    )

    def __init__(self, *, max_message_bytes: int, max_line_bytes: int, reject: bool) -> None:
        self._ctx = _CRLF  # last two processed bytes (look-behind); DATA starts after a CRLF
        self._carry = b""  # undecided bytes held back from the previous block (<= 2)
        self._line = 0  # length of the current, unfinished output line
        self._max_size = max_message_bytes
        self._max_line = max_line_bytes
        self._reject = reject
        self.size = 0  # content bytes produced (whether written or not)
        self.written = 0
        self.wire = 0
        self.bare_lf = 0
        self.bare_cr = 0
        self.longest = 0
        self.bare = False
        self.too_big = False
        self.too_long = False

    def feed(self, block: bytes) -> tuple[int, bytes]:
        """Scan one non-empty wire block.

        Returns ``(used, out)``: ``used`` is -1 while the terminator has not been seen, else the
        number of bytes of ``block`` up to and including it (the rest is not DATA); ``out`` is the
        content to write now (empty once the message is doomed).
        """
        carried = len(self._carry)
        data = self._carry + block if carried else block  # no copy in the common case
        # A terminator can start in the processed bytes only as their final CRLF: a processed
        # CR at the very end is always bare, and a line-initial "." or ".\r" is never processed
        # without the byte after it.
        if self._ctx == _CRLF and data.startswith(b".\r\n"):
            used = 3 - carried
            self.wire += used
            self._carry = b""
            return used, b""
        # Most blocks have no line-initial dot at all: one memchr-speed search then rules out
        # both a terminator and any unstuffing.
        dot = data.find(_CRLF_DOT)
        t = data.find(_TERM, dot) if dot >= 0 else -1
        if t >= 0:
            used = t + len(_TERM) - carried
            self.wire += used
            self._carry = b""
            return used, self._process(data, t + len(_CRLF), True)
        self.wire += len(block)
        n = len(data)
        end = n
        look = self._ctx + data[-3:]  # the last bytes, with look-behind for short data
        if look[-1] == _CR:  # is it a bare CR? depends on the next byte
            end = n - 1
            if n >= 2 and look[-2] == _DOT and look[-3] in _BREAKS:
                end = n - 2  # line-initial ".\r": maybe the terminator
        elif look[-1] == _DOT and look[-2] in _BREAKS:
            end = n - 1  # line-initial ".": maybe the terminator, else unstuffed
        out = self._process(data, end, dot >= 0)
        if end < n:
            self._carry = data[end:]
        else:
            self._carry = b""
        return -1, out

    def _process(self, data: bytes, end: int, dots: bool) -> bytes:
        """Account for and render ``data[:end]``, a region whose every byte is decidable.

        Invariants: the processed byte before the region is not the CR of a CRLF split across
        the region boundary, and a CR at the region's end is known to be bare (its successor is
        held back and is not LF) or the region ends with a CRLF. ``dots`` is False when ``data``
        is known to hold no CRLF followed by a dot.
        """
        if end <= 0:
            return b""
        region = data if end == len(data) else data[:end]
        line_start = self._ctx[-1] in _BREAKS
        self._ctx = (self._ctx + region[-2:])[-2:]
        out, lines = _unstuff(region, line_start, dots)
        # With the CRLFs split out, any CR or LF left is bare (unstuffing never makes or breaks a
        # CRLF). Joining and two memchr-speed searches beat counting CR and LF in every block.
        rest = b"".join(lines) if len(lines) > 1 else out
        if b"\r" in rest or b"\n" in rest:
            crlf = len(lines) - 1
            self.bare_lf += region.count(b"\n") - crlf
            self.bare_cr += region.count(b"\r") - crlf
            if self._reject:
                self.bare = True
            # Bare CR and bare LF become CRLF: collapse CRLF to LF, CR to LF, then LF to CRLF.
            region = region.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)
            out, lines = _unstuff(region, line_start, True)
        self.size += len(out)
        if len(lines) == 1:
            self._line += len(out)
            longest = self._line
        else:
            longest = max(self._line + len(lines[0]), max(map(len, lines)))
            self._line = len(lines[-1])
        if longest > self.longest:
            self.longest = longest
        if self.size > self._max_size:
            self.too_big = True
        if self.longest > self._max_line:
            self.too_long = True
        if self.bare or self.too_big or self.too_long:
            return b""
        self.written += len(out)
        return out

    def outcome(self) -> DataOutcome:
        if self.bare:
            status = DataStatus.BARE_NEWLINE
        elif self.too_big:
            status = DataStatus.TOO_BIG
        elif self.too_long:
            status = DataStatus.LINE_TOO_LONG
        else:
            status = DataStatus.OK
        return DataOutcome(status, self.written, self.wire, self.bare_lf, self.bare_cr,
                           self.longest)


def _unstuff(region: bytes, line_start: bool, dots: bool) -> tuple[bytes, list[bytes]]:
    """Drop the first dot of every line of CRLF-delimited ``region``; return it and its lines.

    ``line_start`` tells whether the region itself begins a line; ``dots`` False promises that
    no CRLF in it is followed by a dot. (split+join is about twice as fast as ``replace``.)
    """
    out = _CRLF.join(region.split(_CRLF_DOT)) if dots else region
    if line_start and out[:1] == b".":
        out = out[1:]
    return out, out.split(_CRLF)


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back in front of ``reader``'s buffer, ahead of anything still unread.

    Uses the private ``StreamReader._buffer`` bytearray (present since Python 3.4; the test
    suite pins this). Must run with no await since the ``read()`` that returned ``data``.
    """
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        raise RuntimeError("StreamReader internals changed: no _buffer bytearray to unread into")
    buffer[:0] = data


def check_unread() -> str | None:
    """None when :func:`_unread` puts bytes back in front of a ``StreamReader``'s data; else
    why not. Runs no loop: a ``read()`` with data buffered finishes at its first step."""
    loop = asyncio.new_event_loop()
    try:
        reader = asyncio.StreamReader(loop=loop)
        reader.feed_data(b"DATA\r\n")
        first = _step(reader.read(2))
        _unread(reader, b"\r\n.\r\nQUIT\r\n" + first)
        again = _step(reader.read(100))
    except RuntimeError as e:
        return str(e)
    finally:
        loop.close()
    if first != b"DA" or again != b"\r\n.\r\nQUIT\r\nDATA\r\n":
        return f"bytes put back came out as {again!r}"
    return None


def _step(coro: Any) -> bytes:
    try:
        coro.send(None)
    except StopIteration as stop:
        return bytes(stop.value)
    coro.close()
    raise RuntimeError("StreamReader.read waited although data was buffered")


UNREAD = patches.install("asyncio.streamreader-unread", check_unread)


async def _line(reader: asyncio.StreamReader, size: int) -> bytes:
    """Public-API reading, for when :func:`_unread` cannot be used: up to and including the
    next LF, at most about the reader's limit at a time; at EOF what is left."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        return e.partial
    except asyncio.LimitOverrunError as e:  # a long line: the part before the LF, in pieces
        return await reader.readexactly(max(1, min(e.consumed, size)))


async def read_data(
    reader: asyncio.StreamReader,
    write: Callable[[bytes], object],
    *,
    max_message_bytes: int,
    max_line_bytes: int = 998,
    bare_newline: Literal["reject", "normalize"] = "reject",
    idle_timeout_s: float,
    deadline: float,
    scope: Deadline | None = None,
    min_rate_bytes_per_s: int = 0,
    rate_grace_s: float = 0.0,
) -> DataOutcome:
    """Read one DATA phase (after the 354 reply) up to and including ``<CRLF>.<CRLF>``.

    Content goes to ``write`` in block-sized pieces. Bytes after the terminator stay in
    ``reader``. ``deadline`` is a ``loop.time()`` value. ``scope``: the connection's
    ``Deadline`` for the reads (else one ``asyncio.timeout`` each). ``min_rate_bytes_per_s``
    (0: none) and ``rate_grace_s``: the minimum data rate (module docstring). Raises
    :class:`DataTimeout` (:class:`DataTooSlow` below the rate) and :class:`DataEOF`; errors
    set on the reader by its protocol propagate unchanged.
    """
    if bare_newline not in ("reject", "normalize"):
        raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")
    if max_message_bytes < 0 or max_line_bytes < 0 or min_rate_bytes_per_s < 0:
        raise ValueError("limits must not be negative")
    loop = asyncio.get_running_loop()
    scanner = _Scanner(max_message_bytes=max_message_bytes, max_line_bytes=max_line_bytes,
                       reject=bare_newline == "reject")
    began = loop.time()
    # the loop time at which the rate credit runs out (never, without a minimum rate)
    credit_until = began + rate_grace_s if min_rate_bytes_per_s else math.inf
    while True:
        now = loop.time()
        if now >= deadline:
            raise DataTimeout(f"DATA deadline passed after {scanner.wire} bytes")
        if now >= credit_until:
            raise DataTooSlow(scanner.wire, now - began, min_rate_bytes_per_s)
        limit = min(deadline, now + idle_timeout_s)
        slow = credit_until < limit  # the credit runs out first
        if slow:
            limit = credit_until
        timeout = asyncio.timeout_at(limit) if scope is None else scope(limit - now)
        try:
            async with timeout:
                block = await (reader.read(BLOCK_SIZE) if UNREAD else _line(reader, BLOCK_SIZE))
        except TimeoutError:
            if timeout.expired():
                if slow:
                    raise DataTooSlow(scanner.wire, loop.time() - began,
                                      min_rate_bytes_per_s) from None
                raise DataTimeout(f"DATA timed out after {scanner.wire} bytes") from None
            raise
        if not block:
            raise DataEOF(f"connection closed in DATA after {scanner.wire} bytes")
        if min_rate_bytes_per_s:  # earned by this block, at most rate_grace_s banked
            credit_until = min(loop.time() + rate_grace_s,
                               credit_until + len(block) / min_rate_bytes_per_s)
        used, out = scanner.feed(block)
        if 0 <= used < len(block):  # never in line mode: a line ends at its LF
            _unread(reader, block[used:])
        if out:
            write(out)
        if used >= 0:
            return scanner.outcome()
