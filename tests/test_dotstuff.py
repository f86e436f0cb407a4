"""Dot-stuffing a message held in pieces equals stuffing it joined, and the
stamped pieces equal the stamped message (proxy/smtp/dotstuff.py, stamp.py)."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.smtp.dotstuff import ends_with_crlf, stuffed
from proxy.smtp.stamp import stamp, stamp_pieces


def reference(content: bytes) -> bytes:
    """What the relay always sent (before pieces): RFC 5321 4.5.2 on CRLF lines."""
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\r\n.", b"\r\n..")


def split(data: bytes, cuts: list[int]) -> list[bytes | memoryview]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    view = memoryview(data)
    # Alternate bytes and views, empty pieces included.
    return [bytes(view[a:b]) if i % 2 else view[a:b]
            for i, (a, b) in enumerate(itertools.pairwise(edges))]


messages = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b".."]),
                    max_size=40).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(messages, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_stuffing_pieces_equals_stuffing_the_whole(message: bytes, cuts: list[int]) -> None:
    pieces = split(message, cuts)
    assert b"".join(stuffed(pieces)) == reference(message)
    assert ends_with_crlf(pieces) == (message.endswith(b"\r\n") if message else None)


def test_stuffing_never_copies_a_large_piece() -> None:
    body = b"line\r\n" * 200_000 + b".dot line\r\nend\r\n"
    out = list(stuffed([b"X-Triage-Category: primary\r\n", memoryview(body)]))
    assert b"".join(out) == reference(b"X-Triage-Category: primary\r\n" + body)
    assert max(len(p) for p in out if isinstance(p, bytes)) < 100  # only the inserted dots
    assert all(p.obj is body for p in out if isinstance(p, memoryview) and len(p) > 100)


@given(st.sampled_from([
    b"From: a@x\r\nX-Triage-Category: spam\r\nSubject: hi\r\n\r\nbody\r\n.dot\r\n",
    b"From: a@x\nSubject: hi\n\nbare LF body\n",
    b"Subject: hi\r\n",
    b"\r\nbody only\r\n",
    b"",
]), st.sampled_from(["", "[tag]"]))
def test_stamp_pieces_join_to_the_stamped_message(raw: bytes, tag: str) -> None:
    fields = [("X-Triage-Category", "primary"), ("X-Triage-Model", "m/1")]
    names = ["X-Triage-Category", "X-Triage-Model"]
    pieces = stamp_pieces(raw, fields, names, tag)
    assert b"".join(pieces) == stamp(raw, fields, names, tag)
    body = pieces[-1]
    # The body is the message itself or a view of it, never a copy.
    assert body is raw or (isinstance(body, memoryview) and body.obj is raw)
