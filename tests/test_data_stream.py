"""proxy/smtp/syntax.py: the message cut from the DATA stream (one copy) and
dot-unstuffed gives what the stream-level reference gave: join the parts,
check and fix line endings on the whole stream, unstuff, cut CRLF and ".CRLF"."""

from __future__ import annotations

import itertools
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.smtp import syntax

_END = b"\r\n.\r\n"


def _reference(stream: bytes, normalize: bool) -> tuple[bool, bytes]:
    """The previous implementation, on the joined stream (CRLF + message + ".CRLF")."""
    bare = syntax.has_bare_line_ending(stream)
    if bare and normalize:
        stream = re.sub(rb"\r\n|\r|\n", b"\r\n", stream)
    if b"\r\n.." in stream:
        stream = stream.replace(b"\r\n..", b"\r\n.")
    return bare, stream[2:-3]


def _ours(parts: list[bytes], normalize: bool) -> tuple[bool, bytes]:
    message = syntax.message_from_stream(parts)
    bare = syntax.has_bare_line_ending(message)
    if bare and normalize:
        message = syntax.normalize_line_endings(message)
    return bare, syntax.unstuff(message)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    """`stream` cut at `cuts` (taken modulo its length), any way at all."""
    points = sorted({c % len(stream) for c in cuts} - {0})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


_LINE_BITS = st.sampled_from([b".", b"..", b"...", b"\r\n", b"\n", b"\r", b"x", b"\r\n..", b"\r\n.", b" ", b"\xff"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE_BITS, max_size=30), st.lists(st.integers(0, 10_000), max_size=4), st.booleans())
def test_same_message_as_the_stream_reference(bits: list[bytes], cuts: list[int], normalize: bool) -> None:
    message = b"".join(bits)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if _END in b"\r\n" + message:
        return  # DATA would have ended there: not a stream read_data returns
    stream = b"\r\n" + message + b".\r\n"
    assert stream.endswith(_END)
    parts = _split(stream, cuts)
    assert b"".join(parts) == stream
    assert _ours(parts, normalize) == _reference(stream, normalize)


def test_examples() -> None:
    assert syntax.unstuff(syntax.message_from_stream([b"\r\n..a\r\n..\r\nb\r\n.\r\n"])) == b".a\r\n.\r\nb\r\n"
    assert syntax.message_from_stream([b"\r\n.\r\n"]) == b""
    assert syntax.message_from_stream([b"\r\nab", b"cd\r", b"\n.\r\n"]) == b"abcd\r\n"
    # Parts too short for the cut views (read_data never hands these out).
    assert syntax.message_from_stream([b"\r", b"\nab\r\n.", b"\r\n"]) == b"ab\r\n"
    assert syntax.message_from_stream([b"\r\nab\r\n.\r", b"\n"]) == b"ab\r\n"
