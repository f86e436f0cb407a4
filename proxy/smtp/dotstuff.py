"""SMTP transparency for an outgoing message held in pieces (RFC 5321 4.5.2).

A message on its way to the next hop is a few pieces: our header fields, the
header block, and a view of the body the session received (proxy/smtp/stamp.py
`stamp_pieces`). Stuffing and sending them piece by piece, in views, keeps a
20 MB message at one copy in memory, not the three that `content.replace`,
`content + b".\\r\\n"` and the transport's buffer made (issue 9, finding 7).

The rule is the one the relay always applied: a "." that starts a line (at
the start of the message, or after CRLF) gets a second "." in front.
Pieces may split a CRLF or a CRLF "." anywhere; the result is the same as
stuffing the joined message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

Piece = bytes | memoryview

_DOT_LINE = re.compile(rb"\r\n\.")  # re scans a memoryview without copying it
_DOT = b"."


def stuffed(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """The pieces with every line-starting "." doubled: views of the input
    and one-byte b"." inserts, never a copy of a piece."""
    tail = b"\r\n"  # the last two bytes seen: the message starts at a line start
    for piece in pieces:
        view = memoryview(piece)
        n = len(view)
        if n == 0:
            continue
        start = 0
        if view[0] == 0x2E and tail == b"\r\n":  # "." right after a CRLF that ended the last piece
            yield _DOT
        elif n >= 2 and tail[-1:] == b"\r" and view[0] == 0x0A and view[1] == 0x2E:
            yield view[:1]  # the LF that completes the last piece's CR
            yield _DOT
            start = 1
        for m in _DOT_LINE.finditer(view, start):
            dot = m.end() - 1
            yield view[start:dot]
            yield _DOT
            start = dot
        yield view[start:]
        tail = (tail + bytes(view[-2:]))[-2:]


def ends_with_crlf(pieces: Iterable[Piece]) -> bool | None:
    """Whether the joined pieces end with CRLF; None when they are empty."""
    tail = b""
    for piece in pieces:
        if len(piece):
            tail = (tail + bytes(memoryview(piece)[-2:]))[-2:]
    return None if not tail else tail == b"\r\n"


__all__ = ["Piece", "ends_with_crlf", "stuffed"]
