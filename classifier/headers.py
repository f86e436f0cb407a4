"""Where a message's header block ends, and its header fields. Bytes in, no I/O.

The one place that decides this for stamping, the header rules, the
overrides, feature extraction and the pipeline's Message-ID: when two readers
disagree on where the header ends, a sender can hide a field from one and show
it to the other (a forged X-Triage-Category in "the body" that a mail reader
shows as a header, or a body line the stamper deletes as a forged header).

Rules (RFC 5322 2.1, 2.2, 3.2.2, 4.5.x), read leniently as MTAs and mail readers do:
- A line ends at LF, with or without a CR before it (SMTP gives CRLF; files,
  pipes and some senders give bare LF; a message may mix both). A bare CR ends
  nothing: it is data.
- The header block ends at the first empty line ("\\r\\n" or "\\n"); a message
  that starts with one has no header fields; one without any is all header.
- A field is `name *WSP ":" value`: the whitespace before the colon is the
  obsolete syntax of RFC 5322 4.5 (obs-optional), which SpamAssassin and many
  readers still accept, so we accept it too. Names compare case-insensitively.
- A line starting with SP or HTAB continues the field above (folding); the
  unfolded value joins its lines with one space.

Lives in `classifier` (which never imports `proxy`) so both packages can use it
without a new top-level package. Regex and `bytes.find` only: the classifier
reads headers for >= 5,000 messages/s per core, so no email.parser here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

CRLF: Final = b"\r\n"
LF: Final = b"\n"

# One field with its continuation lines, at the start of a line (re.M): the
# name is printable ASCII but ":" (RFC 5322 ftext), then optional WSP
# (obs-optional), ":", optional WSP and the raw value. "." stops at LF only, so
# the value keeps a CR before the LF; strip() or unfold() drops it.
FIELD: Final = re.compile(rb"^([!-9;-~]+)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.M)
_FOLD: Final = re.compile(rb"\r?\n[ \t]+")


def split(raw: bytes, limit: int | None = None) -> tuple[int, int]:
    """(end of the header block, start of the body) in `raw`.

    The header block `raw[:end]` keeps its last line's line ending; the empty
    line lies between the two offsets. No empty line: (len(raw), len(raw)).
    With `limit`, only `raw[:limit]` is searched for the empty line, and a
    header longer than that is cut there with no body: (limit, len(raw)).
    """
    n = len(raw) if limit is None else max(0, min(limit, len(raw)))
    if n >= 1 and raw[0] == 10:  # b"\n": starts with an empty line
        return 0, 1
    if n >= 2 and raw[0] == 13 and raw[1] == 10:  # b"\r\n"
        return 0, 2
    # Search growing windows for an empty line with the line ending the first
    # line has, and for the other kind only before it: a pattern that is not
    # there must not cost a scan of a multi-megabyte body.
    nl = raw.find(b"\n", 0, n)
    likely, other = (b"\n\r\n", b"\n\n") if nl > 0 and raw[nl - 1] == 13 else (b"\n\n", b"\n\r\n")
    lo, hi = 0, 4096
    while True:
        hi = min(hi, n)
        a = raw.find(likely, lo, hi)
        b = raw.find(other, lo, a + len(other) if a >= 0 else hi)  # only if it comes first
        e, sep = (b, other) if b >= 0 else (a, likely)
        if e >= 0:
            return e + 1, e + len(sep)
        if hi >= n:
            return n, len(raw)
        lo, hi = hi - 2, hi * 16  # the overlap finds an empty line across the edge


def head(raw: bytes, limit: int | None = None) -> bytes:
    """The header block of `raw` (its last line ending included)."""
    return raw[: split(raw, limit)[0]]


def line_ending(raw: bytes) -> bytes:
    """The line ending of the first line of `raw`: LF for bare-LF mail, else CRLF.

    New fields are written with it, so a message whose lines all end in LF
    does not come out with mixed line endings. No line at all: CRLF (SMTP).
    """
    i = raw.find(b"\n")
    return LF if i == 0 or (i > 0 and raw[i - 1] != 13) else CRLF


def unfold(value: bytes) -> bytes:
    """A raw field value (as FIELD gives it) on one line, trimmed."""
    if b"\n" in value:
        value = _FOLD.sub(b" ", value)
    return value.strip()


def fields(block: bytes, wanted: Collection[bytes]) -> dict[bytes, bytes]:
    """The fields of a header block named in `wanted` (lower case): the first
    occurrence of each, unfolded, keyed by lower-case name."""
    out: dict[bytes, bytes] = {}
    for name, value in FIELD.findall(block):
        key = name.lower()
        if key in wanted and key not in out:
            out[key] = unfold(value)
    return out


def field(block: bytes, name: bytes) -> bytes | None:
    """The first `name` field (lower case) of a header block, unfolded; None if absent."""
    m = find(block, name)
    return None if m is None else unfold(m.group(2))


def remove(block: bytes, names: Collection[bytes]) -> bytes:
    """The header block without fields named in `names` (lower case), continuation
    lines and line endings included; every other byte is kept as it was."""
    low = block.lower()
    if not any(n in low for n in names):
        return block  # the usual case: none of them anywhere
    out: list[bytes] = []
    pos = 0
    for m in FIELD.finditer(block):
        if m.group(1).lower() in names:
            out.append(block[pos : m.start()])
            end = m.end()  # at the LF ending the field's last line, or the end
            pos = end + 1 if block[end : end + 1] == b"\n" else end
    if not out:
        return block
    out.append(block[pos:])
    return b"".join(out)


def find(block: bytes, name: bytes) -> re.Match[bytes] | None:
    """The first `name` field (lower case) of a header block, as a FIELD match."""
    low = block.lower()
    i = low.find(name)
    while i >= 0:  # C-speed scans for the name; the regex only where it starts a line
        if i == 0 or low[i - 1] == 10:
            m = FIELD.match(block, i)
            if m is not None and len(m.group(1)) == len(name):
                return m
        i = low.find(name, i + 1)
    return None


__all__ = [
    "CRLF",
    "FIELD",
    "LF",
    "field",
    "fields",
    "find",
    "head",
    "line_ending",
    "remove",
    "split",
    "unfold",
]
