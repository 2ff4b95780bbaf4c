"""A TNEF stream's shape checked before the ``tnefparse`` library reads it: the counts a
stream declares must fit in the bytes it has, so the library's loops stay linear in the
stream's length.

Why: ``tnefparse`` (1.4) trusts the counts it reads. A MAPI property list declaring 4 billion
properties makes ``decode_mapi`` loop 4 billion times past the end of the data, logging a
warning each time (a 1 KB winmail.dat: a worker thread spinning for hours and gigabytes of
log, the filter timing out into a 451 the sender retries); a multi-valued property declaring
4 billion fixed-size values builds 4 billion objects out of empty slices; and every TNEF
object is read from a fresh copy of the rest of the stream (quadratic in the object count).

:func:`problem` walks the stream as ``TNEF.__init__`` does (objects, then the MAPI lists of
message properties, attachment properties, recipient rows; embedded messages too) and returns
why the stream must not be given to the library, or None. It never builds the values. Where
the library would stop on an error (a read past the end, an unknown type) the walk stops too:
what the library then does with the stream is bounded already.
"""

from __future__ import annotations

import struct

from tnefparse.mapi import IMESSAGE_SIG
from tnefparse.tnef import TNEF, Attribute

MAX_COPIED = 2 * 1024**3  # bytes the library's per-object slicing may copy in all (~0.5 s)
MAX_EMBEDDED = 8  # TNEF messages embedded in attachments, nested
MV_FLAG, GUID_FLAG = 0x1000, 0x8000
_FIXED = {0x0002: 2, 0x000B: 2, 0x0003: 4, 0x0004: 4, 0x000A: 4, 0x0005: 8, 0x0007: 8,
          0x0006: 8, 0x0014: 8, 0x0040: 8, 0x0048: 16}  # MAPI type -> bytes a value
_VARIABLE = frozenset((0x001E, 0x001F, 0x000D, 0x0102, 0x0000))


class _Stop(Exception):
    """The library would stop reading here (an error it raises or catches)."""


class Implausible(Exception):
    """A count the stream cannot hold."""


def problem(data: bytes, depth: int = 0) -> str | None:
    """Why ``data`` (a TNEF stream) must not be parsed by ``tnefparse``, or None."""
    try:
        _stream(data, depth)
    except Implausible as e:
        return str(e)
    return None


def _u(fmt: str, data: bytes, at: int) -> int:
    try:
        value: int = struct.unpack_from(fmt, data, at)[0]
    except struct.error:
        raise _Stop from None
    return value


def _stream(data: bytes, depth: int) -> None:
    if depth > MAX_EMBEDDED:
        raise Implausible(f"TNEF messages embedded more than {MAX_EMBEDDED} deep")
    offset, copied, n = 6, 0, len(data)
    while offset + TNEF.MIN_OBJ_SIZE < n:
        copied += n - offset
        if copied > MAX_COPIED:
            raise Implausible("too many TNEF objects for its size")
        level, name = data[offset], _u("<H", data, offset + 1)
        length = min(n - offset, _u("<I", data, offset + 5) + 11)
        body = data[offset + 9:offset + length - 2]
        try:
            if level == TNEF.LVL_ATTACHMENT:
                if name == TNEF.ATTATTACHMENT:
                    _mapi(body, 0, depth)
            elif name == TNEF.ATTMAPIPROPS:
                _mapi(body, 0, depth)
            elif name == TNEF.ATTRECIPTABLE:
                rows, at = _u("<I", body, 0), 4
                if rows > (len(body) - at) // 4 + 1:
                    raise Implausible(f"{rows} recipient rows in {len(body)} bytes")
                for _ in range(rows):
                    at = _mapi(body, at, depth)
        except _Stop:
            pass
        offset += length


def _mapi(data: bytes, offset: int, depth: int) -> int:
    """The offset after a MAPI property list (``decode_mapi``'s arithmetic)."""
    n = len(data)
    count = _u("<I", data, offset)
    offset += 4
    if count > (n - offset) // 4 + 1:
        raise Implausible(f"{count} MAPI properties in {n - offset} bytes")
    for _ in range(count):
        if offset >= n:
            break
        kind, name = _u("<H", data, offset), _u("<H", data, offset + 2)
        offset += 4
        if name >= GUID_FLAG:
            offset += 16
            if _u("<I", data, offset) == 0:
                offset += 8
            else:
                size = _u("<I", data, offset + 4)
                offset += 8 + size + (-size % 4)
        values = None
        if kind & MV_FLAG:
            kind ^= MV_FLAG
            values = _u("<I", data, offset)
            offset += 4
        if kind in _FIXED:
            size = _FIXED[kind]
            if (values or 1) > (n - offset) // size + 1:
                raise Implausible(f"{values} MAPI values in {n - offset} bytes")
            offset += size * (values or 1)
            if (values or 1) % 2 and size == 2:
                offset += 2
        elif kind in _VARIABLE:
            items = 1 if values else _u("<I", data, offset)
            offset += 0 if values else 4
            for _ in range(values or 1):
                for _ in range(items):
                    size = _u("<I", data, offset)
                    size += -size % 4  # the library reads the padded length
                    item = data[offset + 4:offset + 4 + size]
                    offset += 4 + size
                    if name == Attribute.MAPI_ATTACH_DATA_OBJ and item.startswith(IMESSAGE_SIG):
                        _stream(item[len(IMESSAGE_SIG):], depth + 1)
        else:
            raise _Stop  # the library raises on an unknown type
    return offset
