"""Header stamping on raw bytes: prepend our fields, drop forged copies.

No email.generator round trip: the body and every header we do not touch stay
byte-identical, so DKIM signatures (RFC 6376) still verify. New fields go at
the top, like trace fields (RFC 5321 4.4), above any DKIM-Signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def header_end(raw: bytes) -> int:
    """Offset of the empty line ending the header block (its CRLF), or -1."""
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(b"\r\n\r\n")
    return end + 2 if end >= 0 else -1


def _drop_fields(block: bytes, names: frozenset[bytes]) -> bytes:
    """Remove fields named in `names` (lower case), continuation lines included."""
    out: list[bytes] = []
    dropping = False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name = line.partition(b":")[0].strip().lower()
        dropping = name in names
        if not dropping:
            out.append(line)
    return b"".join(out)


def _tag_subject(block: bytes, tag: bytes) -> bytes:
    lines = block.splitlines(keepends=True)
    for i, line in enumerate(lines):
        head, colon, value = line.partition(b":")
        if colon and head.strip().lower() == b"subject":
            if tag.lower() not in value.lower():  # don't stack tags on replies
                lines[i] = head + b": " + tag + b" " + value.lstrip(b" ")
            return b"".join(lines)
    return block + b"Subject: " + tag + b"\r\n"


def stamp(
    raw: bytes,
    fields: Sequence[tuple[str, str]],
    remove: Iterable[str],
    subject_tag: str = "",
) -> bytes:
    """`raw` with `fields` on top and incoming fields named in `remove` gone."""
    # A CR or LF in a value (a model name, say) must not start a new field.
    new = b"".join(
        f"{name}: {' '.join(value.splitlines())}\r\n".encode() for name, value in fields
    )
    names = frozenset(n.lower().encode() for n in remove)
    end = header_end(raw)
    if end < 0:  # no body separator: the whole message is header
        end = len(raw)
    block = raw[:end]
    lowered = block.lower()
    changed = False
    # Fast path: most mail carries none of our fields.
    if any(n + b":" in lowered or n + b" :" in lowered for n in names):
        block = _drop_fields(block, names)
        changed = True
    if subject_tag:
        block = _tag_subject(block, subject_tag.encode("utf-8"))
        changed = True
    if not changed:
        return new + raw
    return new + block + raw[end:]
