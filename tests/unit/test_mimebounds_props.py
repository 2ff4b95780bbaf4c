"""Property tests: whatever the structure (random trees of multipart and message/rfc822
containers, hundreds deep or wide) or the bytes (text with uuencode/yEnc/BinHex/TNEF markers),
the MIME parse and the hidden-file decoders give an answer — never an exception — and the
depth finding appears exactly when the tree is deeper than the bound."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from filters._hidden import TNEF_SIGNATURE, hidden_files
from filters.attachments import AttachmentsFilter
from gateway import mime
from gateway.mimebounds import MimeLimits
from gateway.services import Services

Tree = st.recursive(
    st.sampled_from([b"text/plain", b"application/octet-stream", b"text/html"]),
    lambda kids: st.one_of(
        st.lists(kids, min_size=1, max_size=3).map(lambda ks: ("multipart", ks)),
        kids.map(lambda k: ("message", k))),
    max_leaves=40)


def render(node: object, n: list[int]) -> tuple[bytes, int]:
    """(entity bytes, container depth) of a tree node."""
    if isinstance(node, bytes):
        return b"Content-Type: " + node + b"\r\n\r\nleaf\r\n", 0
    kind, kids = node  # type: ignore[misc]
    if kind == "message":
        inner, d = render(kids, n)
        return b"Content-Type: message/rfc822\r\n\r\nSubject: s\r\n" + inner, d + 1
    n[0] += 1
    b = b"b%d" % n[0]
    body, deepest = b"", 0
    for k in kids:
        part, d = render(k, n)
        body += b"--" + b + b"\r\n" + part
        deepest = max(deepest, d)
    return (b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n' + body
            + b"--" + b + b"--\r\n", deepest + 1)


@settings(max_examples=60, deadline=None)
@given(Tree, st.integers(1, 6), st.integers(0, 3))
def test_any_tree_parses_and_is_cut_exactly_at_the_bound(tree: object, bound: int,
                                                         chain: int) -> None:
    data, depth = render(tree, [0])
    for _ in range(chain):  # lengthen it: nested message/rfc822 wrappers
        data, depth = b"Content-Type: message/rfc822\r\n\r\nSubject: s\r\n" + data, depth + 1
    view = mime.parse_bytes(b"From: a@b.test\r\n" + data, MimeLimits(max_depth=bound))
    deep = [s for s, _ in view.limits if s == "MIME_TOO_DEEP"]
    assert bool(deep) == (depth > bound), (depth, bound, view.limits)
    AttachmentsFilter.from_config({}, Services()).check_view(view)  # never raises


MARKERS = [b"begin 644 a.exe\r\n", b"begin-base64 644 b.zip\r\n", b"=ybegin line=128 name=c\r\n",
           b"=ypart begin=1\r\n", b"=yend\r\n", b"end\r\n", b"====\r\n", b"`\r\n",
           b"(This file must be converted with BinHex 4.0)\r\n:", b":", b"\r\n"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(MARKERS), st.binary(max_size=40)), max_size=30),
       st.booleans())
def test_hidden_file_decoders_never_raise(pieces: list[bytes], tnef: bool) -> None:
    data = b"".join(pieces)
    if tnef:
        data = TNEF_SIGNATURE + data
    for f in hidden_files("text/plain", data, 4096):
        assert len(f.data) <= 4096
