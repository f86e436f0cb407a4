"""classifier.headers: where the header ends and what its fields are, and that
stamping, rules, overrides, features and the pipeline all read it the same way."""

from __future__ import annotations

import email.parser
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from classifier import features, headers
from classifier.overrides import sure_category
from classifier.rules import header_fields
from proxy.pipeline import message_id_of
from proxy.smtp.stamp import stamp

OURS = (
    "X-Triage-Category",
    "X-Triage-Score",
    "X-Triage-Spam",
    "X-Triage-Spam-Score",
    "X-Triage-Model",
)
NEW = [("X-Triage-Category", "forums")]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", (12, 14)),
        (b"A: 1\nB: 2\n\nbody\n", (10, 11)),
        (b"A: 1\r\nB: 2\n\nbody", (11, 12)),  # mixed: a CRLF line, a bare-LF one
        (b"A: 1\nB: 2\r\n\r\nbody", (11, 13)),
        (b"A: 1\r\n\nbody", (6, 7)),  # a bare-LF empty line after a CRLF line
        (b"\r\nbody\r\n\r\nmore", (0, 2)),  # starts with the empty line: no header
        (b"\nA: 1\n\nbody", (0, 1)),
        (b"A: 1\r\nB: 2\r\n", (12, 12)),  # no empty line: all header
        (b"A: 1", (4, 4)),
        (b"", (0, 0)),
        (b"A: 1\r\r\nB: 2\r\n\r\n", (13, 15)),  # a bare CR ends no line
        (b"A: 1\r\n \r\nB: 2\r\n\r\nx", (15, 17)),  # a whitespace-only line is a fold, not the end
    ],
)
def test_split(raw: bytes, expected: tuple[int, int]) -> None:
    assert headers.split(raw) == expected


def test_split_limit_cuts_the_head_and_drops_the_body() -> None:
    raw = b"A: 1\r\nB: 2\r\n\r\nbody"
    assert headers.split(raw, 8) == (8, len(raw))
    assert headers.split(raw, 14) == (12, 14)
    assert headers.split(raw, 13) == (13, len(raw))  # the empty line is not all inside


def test_fields_whitespace_before_colon_case_and_folding() -> None:
    block = (
        b"X-Triage-Spam\t: no\r\n"
        b"x-triage-CATEGORY  : primary\r\n"
        b"Subject: a\r\n  folded\r\n\tvalue \r\n"
        b"Subject: second\r\n"
        b"not a field\r\n"
        b"List-Id:<l.example.org>\n"
    )
    got = headers.fields(block, {b"x-triage-spam", b"x-triage-category", b"subject", b"list-id"})
    assert got == {
        b"x-triage-spam": b"no",
        b"x-triage-category": b"primary",
        b"subject": b"a folded value",  # unfolded, first occurrence
        b"list-id": b"<l.example.org>",
    }
    assert headers.field(block, b"subject") == b"a folded value"
    assert headers.field(block, b"from") is None


def test_remove_keeps_every_other_byte() -> None:
    block = (
        b"Received: x\r\n"
        b"X-Triage-Spam\t: no\r\n"
        b"X-Triage-Category  : primary\r\n\tfolded on\r\n"
        b"X-Triage-Spam-Scorer: kept (another name)\r\n"
        b"Subject: X-Triage-Spam: in a value\r\n"
        b"x-TRIAGE-model:m\n"
        b" continued\n"
    )
    out = headers.remove(block, {b"x-triage-spam", b"x-triage-category", b"x-triage-model"})
    assert out == (
        b"Received: x\r\nX-Triage-Spam-Scorer: kept (another name)\r\n"
        b"Subject: X-Triage-Spam: in a value\r\n"
    )
    plain = b"From: a\r\nSubject: b\r\n"
    assert headers.remove(plain, {b"x-triage-spam"}) is plain  # nothing copied when absent


def test_line_ending() -> None:
    assert headers.line_ending(b"A: 1\r\n\r\n") == b"\r\n"
    assert headers.line_ending(b"A: 1\n\n") == b"\n"
    assert headers.line_ending(b"\nbody") == b"\n"
    assert headers.line_ending(b"A: 1") == b"\r\n"


# --- every reader agrees --------------------------------------------------------

BODY_FORGERY = (
    b"X-Triage-Category: in the body stays\nList-Post: <mailto:body@x>\nMessage-ID: <body@x>\n"
)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_every_reader_stops_at_the_same_empty_line(eol: bytes) -> None:
    raw = eol.join([b"From: a@example.org", b"Subject: hi", b"", b""]) + BODY_FORGERY.replace(
        b"\n", eol
    )
    assert header_fields(raw) == {b"from": b"a@example.org", b"subject": b"hi"}
    assert sure_category(raw) is None  # List-Post in the body is no list mail
    assert message_id_of(raw) == ""
    out = stamp(raw, NEW, OURS)
    assert out == b"X-Triage-Category: forums" + eol + raw  # the body line stays
    # Features see the same head: the body's List-Post is not a header token.
    head, body = features._split_head(raw, features.FeatureParams())
    assert b"List-Post" not in head and body.startswith(b"X-Triage-Category")


def test_readers_see_fields_with_whitespace_before_the_colon() -> None:
    raw = b"List-Post : <mailto:l@x>\r\nMessage-ID\t: <m@x>\r\n\r\nbody\r\n"
    assert header_fields(raw)[b"list-post"] == b"<mailto:l@x>"
    assert sure_category(raw) == "forums"
    assert message_id_of(raw) == "<m@x>"
    assert message_id_of(b"Message-ID: <a@x\r\n .example>\r\n\r\n") == "<a@x .example>"


# --- properties ------------------------------------------------------------------

NAME = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12
)
VALUE = st.text('abcdefghij0123456789 <>@.;="', max_size=30).map(str.strip)
EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """(raw, [(name, unfolded value)], body): any mix of line endings, folds
    and whitespace before colons."""
    out: list[tuple[bytes, bytes]] = []
    raw = b""
    for _ in range(draw(st.integers(0, 8))):
        name = draw(NAME).encode()
        words = [draw(VALUE).encode() or b"v" for _ in range(draw(st.integers(1, 3)))]
        gap = draw(st.sampled_from([b"", b" ", b"\t", b"  \t"]))
        raw += name + gap + b": " + words[0]
        for w in words[1:]:
            raw += draw(EOL) + draw(st.sampled_from([b" ", b"\t", b"  "])) + w
        raw += draw(EOL)
        out.append((name, b" ".join(words)))
    body = draw(st.binary(max_size=200))
    return raw + draw(EOL) + body, out, body


@given(messages())
def test_split_finds_the_first_empty_line(
    msg: tuple[bytes, list[tuple[bytes, bytes]], bytes],
) -> None:
    raw, fields, body = msg
    end, start = headers.split(raw)
    assert raw[start:] == body
    assert raw[end:start] in (b"\r\n", b"\n")
    got = [(m.group(1), headers.unfold(m.group(2))) for m in headers.FIELD.finditer(raw[:end])]
    assert got == fields


@given(messages(), st.sampled_from(OURS), st.sampled_from([b"", b" ", b"\t", b" \t "]), EOL)
def test_stamp_removes_every_spelling_and_keeps_the_rest(
    msg: tuple[bytes, list[tuple[bytes, bytes]], bytes], forged: str, gap: bytes, eol: bytes
) -> None:
    raw, _, body = msg
    spelled = forged.encode().swapcase() if len(raw) % 2 else forged.encode()
    # "@" is in no generated name and "o" in no generated value: the markers are ours alone.
    forged_raw = spelled + gap + b": @forged@" + eol + b" @folded@" + eol + raw
    for fields in (NEW, []):  # stamped, and passed through unclassified
        out = stamp(forged_raw, fields, OURS)
        _, start = headers.split(out)
        assert out[start:] == body  # the body is byte-identical
        assert b"@forged@" not in out and b"@folded@" not in out
        # Everything but the forged field is there, byte for byte, below ours.
        assert out.endswith(raw)


@given(st.binary(max_size=300))
def test_any_bytes(raw: bytes) -> None:
    end, start = headers.split(raw)
    assert 0 <= end <= start <= len(raw)
    block = raw[:end]
    out = headers.remove(block, {b"x-triage-spam"})
    assert headers.field(out, b"x-triage-spam") is None
    stamped = stamp(raw, NEW, OURS)
    assert stamped.endswith(raw[start:])


@given(messages())
def test_fields_agree_with_email_parser(
    msg: tuple[bytes, list[tuple[bytes, bytes]], bytes],
) -> None:
    """Without whitespace before colons (which email.parser does not read as a
    field), the stdlib parser sees the same fields and unfolded values."""
    raw, fields, _ = msg
    head = raw[: headers.split(raw)[0]]
    if b" :" in head or b"\t:" in head:
        return
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
        raw, headersonly=True
    )
    got = [(k.encode(), " ".join(v.split()).encode()) for k, v in parsed.items()]
    assert got == [(n, b" ".join(v.split())) for n, v in fields]


def reference_split(raw: bytes, limit: int | None = None) -> tuple[int, int]:
    """split() the slow, obvious way: line by line."""
    n = len(raw) if limit is None else min(limit, len(raw))
    pos = 0
    while True:
        nl = raw.find(b"\n", pos, n)
        if nl < 0:
            return n, len(raw)
        if raw[pos:nl] in (b"", b"\r"):  # an empty line
            return pos, nl + 1
        pos = nl + 1


@given(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b"a", b" ", b":"]), max_size=60), st.data())
def test_split_matches_the_line_by_line_reading(parts: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(parts)
    limit = data.draw(st.none() | st.integers(0, len(raw) + 2))
    assert headers.split(raw, limit) == reference_split(raw, limit)


@pytest.mark.parametrize("at", [4090, 4093, 4094, 4095, 4096, 65530, 65533, 65534, 65535, 1 << 20])
@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n"])
def test_split_finds_an_empty_line_across_its_search_windows(at: int, sep: bytes) -> None:
    line = b"X-Pad: " + b"p" * 70 + b"\r\n"
    raw = (line * (at // len(line) + 1))[:at]
    raw = raw[: raw.rfind(b"\n") + 1] + b"Last: " + b"q" * (at - raw.rfind(b"\n") - 1)
    raw = raw[:at] + sep + b"body\n\nmore\r\n\r\n"
    assert headers.split(raw) == reference_split(raw)
    assert raw[headers.split(raw)[1] :] == b"body\n\nmore\r\n\r\n"
