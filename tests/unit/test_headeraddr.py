"""gateway.headeraddr: getaddresses parsed once per value, the same answers."""

from __future__ import annotations

import email.utils

import pytest

from gateway import headeraddr
from gateway.headeraddr import MAX_CACHED, addresses

VALUES = [
    "alice@example.test",
    "Alice <alice@example.test>",
    '"Smith, Bob" <bob@example.test>, carol@example.test',
    "undisclosed-recipients:;",
    "Team: a@x.test, b@y.test;",
    "=?utf-8?q?J=C3=B6rg?= <joerg@example.test>",
    '"a  b"@example.test',
    "no address at all",
    "<@route.test:x@example.test>",
    "",
    "Bob <bob@example.test> (comment)",
    "Mallory <mallory@evil.test>  <alice@example.test>",
]


@pytest.mark.parametrize("value", VALUES)
def test_same_pairs_as_getaddresses(value: str) -> None:
    assert list(addresses(value)) == email.utils.getaddresses([value])


def test_a_value_is_parsed_once() -> None:
    headeraddr._cached.cache_clear()
    first = addresses("Alice <alice@example.test>")
    again = addresses("Alice <alice@example.test>")
    assert again is first  # the same tuple: not parsed again
    assert headeraddr._cached.cache_info().hits == 1


def test_a_long_value_is_parsed_each_time_and_not_kept() -> None:
    headeraddr._cached.cache_clear()
    value = ", ".join(f"user{i}@example.test" for i in range(60))
    assert len(value) > MAX_CACHED
    assert list(addresses(value)) == email.utils.getaddresses([value])
    assert addresses(value) is not addresses(value)
    assert headeraddr._cached.cache_info().currsize == 0


def test_comments_nested_deeper_than_the_bound_are_not_parsed() -> None:
    """getaddresses recurses per comment level: 3000 levels raised RecursionError."""
    from gateway.headeraddr import MAX_COMMENT_DEPTH, comment_depth

    deep = "(" * 3000 + ")" * 3000 + " bob@sender.test"
    assert comment_depth(deep) == 3000
    assert addresses(deep) == ()
    at_bound = "(" * MAX_COMMENT_DEPTH + ")" * MAX_COMMENT_DEPTH + " bob@sender.test"
    assert addresses(at_bound) == (("", "bob@sender.test"),)
    # parentheses that are not comments do not count
    quoted = '"' + "(" * 100 + '" <bob@sender.test>'
    assert comment_depth(quoted) == 0 and addresses(quoted)[0][1] == "bob@sender.test"
    assert comment_depth("a \\( \\( (b) c") == 1


def test_strict_domains_limits() -> None:
    from gateway.headeraddr import MAX_STRICT, strict_domains
    assert strict_domains("Joe <joe@A.Example>, b@a.example") == (("a.example",), True)
    assert strict_domains("Bank <a@b.example> (x")[0] == ("b.example",)
    assert strict_domains("(" * 60 + "x" + ")" * 60 + " a@b.example") == ((), False)
    assert strict_domains("a@b.example " + "x" * MAX_STRICT) == ((), False)
    assert strict_domains('"Just A Name"') == ((), False)
