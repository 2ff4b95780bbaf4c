"""Bounds for the ``tnefparse`` library on a hostile TNEF stream: its loops run through the
counts the stream declares, so the counts get a budget proportional to the stream's size.

Why: ``tnefparse`` (1.4) trusts the counts it reads. A MAPI property list declaring 4 billion
properties makes ``decode_mapi`` loop 4 billion times past the end of the data, logging a
warning each time (a 21-byte winmail.dat: a worker thread spinning for hours and gigabytes of
log, the filter timing out into a 451 the sender retries); a multi-valued property declaring
4 billion fixed-size values builds 4 billion objects from empty slices; a recipient table's
rows each re-read a property list from wherever the previous one stopped. Where a count is
read depends on how the library recovers from errors, so no walk of our own can predict them
all: the library's own loops are bounded instead.

* :func:`budget`: within it, every ``range`` the library's ``tnefparse.mapi`` and
  ``tnefparse.tnef`` modules make draws its length from a per-thread budget (the caller gives
  ``LOOPS_PER_BYTE`` per byte of the stream plus ``LOOPS_BASE``: a real stream's counts sum to
  far less, every value taking bytes); past it :class:`Exhausted` is raised, a
  ``BaseException`` so that the library's own ``except Exception`` cannot swallow it. The
  module-level ``range`` names are the patch ``tnefparse.loop-budget`` (gateway/patches.py):
  checked once per process (the functions still loop with ``range``; the known 21-byte stream
  is stopped). Without it TNEF streams are not parsed at all (the caller reports them bad).
* :func:`problem`: the library reads each TNEF object from a fresh copy of the rest of the
  stream (quadratic in the object count); a stream whose objects would copy more than
  ``MAX_COPIED`` bytes is not given to it. Walked as ``TNEF.__init__`` walks it.
"""

from __future__ import annotations

import builtins
import contextlib
import struct
import threading
from collections.abc import Iterator

from gateway import patches

PATCH = "tnefparse.loop-budget"
LOOPS_PER_BYTE = 1
LOOPS_BASE = 10_000
MAX_COPIED = 2 * 1024**3  # bytes the library's per-object slicing may copy in all (~0.5 s)
MIN_OBJ_SIZE = 12  # tnefparse's TNEF.MIN_OBJ_SIZE
# 21 bytes: one message-level MAPI property list declaring 0xFFFFFFFF properties (with the
# right checksum: the sum of its data bytes, so the library's check logs nothing)
HOSTILE = b"\x78\x9f\x3e\x22\x01\x00\x01" + struct.pack("<HHI", 0x9003, 6, 4) \
    + struct.pack("<IH", 0xFFFFFFFF, 4 * 0xFF)


class Exhausted(BaseException):  # noqa: N818 - a signal through the library, not an error
    """The stream's declared counts went past its loop budget."""


_local = threading.local()


def _range(*args: int) -> range:
    r = builtins.range(*args)
    left: int | None = getattr(_local, "left", None)
    if left is not None:
        left -= len(r)
        _local.left = left
        if left < 0:
            raise Exhausted
    return r


@contextlib.contextmanager
def budget(data: bytes) -> Iterator[None]:
    """The library's loops bounded for a parse of ``data`` in this thread."""
    _local.left = LOOPS_BASE + LOOPS_PER_BYTE * len(data)
    try:
        yield
    finally:
        _local.left = None


def problem(data: bytes) -> str | None:
    """Why ``data`` (a TNEF stream) must not be given to ``tnefparse``, or None."""
    offset, copied, n = 6, 0, len(data)
    while offset + MIN_OBJ_SIZE < n:
        copied += n - offset
        if copied > MAX_COPIED:
            return "too many TNEF objects for its size"
        length = min(n - offset, struct.unpack_from("<I", data, offset + 5)[0] + 11)
        offset += length
    return None


def active() -> bool:
    """Whether the library's loops are bounded (the patch is in use)."""
    return patches.active(PATCH)


def _check() -> str | None:
    from tnefparse import mapi, tnef

    for fn in (mapi.decode_mapi, mapi.parse_property, tnef.TNEF.__init__):
        if "range" not in fn.__code__.co_names:
            return f"{fn.__qualname__} no longer loops with range()"
    if tnef.TNEF.MIN_OBJ_SIZE != MIN_OBJ_SIZE:
        return f"TNEF.MIN_OBJ_SIZE is {tnef.TNEF.MIN_OBJ_SIZE}"
    saved = vars(mapi).get("range")
    mapi.range = _range
    try:
        with budget(HOSTILE):
            tnef.TNEF(HOSTILE)
        return "the budget did not stop a stream declaring 4 billion properties"
    except Exhausted:
        return None
    finally:
        if saved is None:
            del mapi.range
        else:
            mapi.range = saved


def _apply() -> None:
    from tnefparse import mapi, tnef

    mapi.range = _range
    tnef.range = _range


patches.install(PATCH, _check, _apply)
