"""The addresses of a header field's value (From, To, Cc, ...), as ``email.utils.getaddresses``
gives them, parsed once per value: the headers, DMARC, rules and Bayes filters each parse the
same From (the stdlib's parser is pure Python, ~20 us a value), and senders repeat from message
to message. Values longer than ``MAX_CACHED`` are parsed each time, so the cache stays small
whatever the headers hold."""

from __future__ import annotations

import email.utils
import functools

MAX_CACHED = 512  # characters
_Pairs = tuple[tuple[str, str], ...]


def addresses(value: str) -> _Pairs:
    """(display name, address) pairs of one field value, like ``getaddresses([value])``."""
    if len(value) > MAX_CACHED:
        return tuple(email.utils.getaddresses([value]))
    return _cached(value)


@functools.lru_cache(maxsize=1024)
def _cached(value: str) -> _Pairs:
    return tuple(email.utils.getaddresses([value]))
