"""Header stamping on raw bytes: prepend our fields, drop forged copies.

No email.generator round trip: the body and every header we do not touch stay
byte-identical, so DKIM signatures (RFC 6376) still verify. New fields go at
the top, like trace fields (RFC 5321 4.4), above any DKIM-Signature, written
with the message's own line ending (see `classifier.headers.line_ending`).
Where the header ends and what a field is come from `classifier.headers`, the
same reader the classifier uses: a forged field is removed in every spelling a
reader would take for ours (any case, folded, whitespace before the colon).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from classifier import headers
from proxy.smtp.dotstuff import Piece


def _tag_subject(block: bytes, tag: bytes, eol: bytes) -> bytes:
    m = headers.find(block, b"subject")
    if m is None:
        if block and not block.endswith(b"\n"):
            block += eol  # a header-only message whose last line has no ending
        return block + b"Subject: " + tag + eol
    if tag.lower() in headers.unfold(m.group(2)).lower():
        return block  # don't stack tags on replies
    at = m.start(2)  # the value, after the colon and its whitespace
    return block[:at] + tag + b" " + block[at:]


_LOWERED: dict[object, frozenset[bytes]] = {}


def _lowered(names: Iterable[str]) -> frozenset[bytes]:
    """The field names to remove, lower-cased bytes; built once per names tuple
    (the pipeline passes the same one for every message)."""
    if not isinstance(names, tuple):
        return frozenset(n.lower().encode() for n in names)
    got = _LOWERED.get(names)
    if got is None:
        got = frozenset(n.lower().encode() for n in names)
        if len(_LOWERED) < 64:
            _LOWERED[names] = got
    return got


def stamp_pieces(
    raw: bytes,
    fields: Sequence[tuple[str, str]],
    remove: Iterable[str],
    subject_tag: str = "",
) -> list[Piece]:
    """`raw` with `fields` on top and incoming fields named in `remove` gone,
    as pieces to send in order (proxy/smtp/client.py `data`): the new fields,
    the header block, and a view of the rest of `raw`. Nothing of a large
    body is copied (issue 9, finding 7).

    Called with no `fields` too (a message passed unclassified): forged copies
    of our fields must go then as well.
    """
    eol = headers.line_ending(raw)
    # A CR or LF in a value (a model name, say) must not start a new field.
    new = b"".join(
        f"{name}: {' '.join(value.splitlines())}".encode() + eol for name, value in fields
    )
    end, _ = headers.split(raw)
    block = raw[:end]
    changed = headers.remove(block, _lowered(remove))
    if subject_tag:
        changed = _tag_subject(changed, subject_tag.encode("utf-8"), eol)
    if changed is block:
        return [new, raw]
    return [new, changed, memoryview(raw)[end:]]


def stamp(
    raw: bytes,
    fields: Sequence[tuple[str, str]],
    remove: Iterable[str],
    subject_tag: str = "",
) -> bytes:
    """`stamp_pieces` joined: the stamped message as one bytes object."""
    return b"".join(stamp_pieces(raw, fields, remove, subject_tag))
