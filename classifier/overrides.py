"""Header rules that override the model's category where they are sure.

The ONNX model guesses from the whole message; a few header facts are not
guesses. A null Return-Path or a multipart/report body is a delivery or
disposition report (RFC 5321 4.5.5, RFC 6522), and List-Post / Mailman
headers mark a discussion list (RFC 2369). Only these two rules override;
the spam verdict always stays the model's, and an override only applies when
the model knows the target category (a site's own label set may not).

The fields come from classifier.headers, a small scanner over the header block
(microseconds), not a second email.parser pass.
"""

from __future__ import annotations

import msgspec

from classifier import headers
from classifier.types import Classification

# How sure the rule is; stamped as X-Triage-Score for an overridden category.
_SURE = 0.9

# The fields the two rules read (lower case).
_WANTED = frozenset(
    {b"return-path", b"content-type", b"from", b"list-post", b"mailing-list", b"x-beenthere",
     b"x-mailman-version", b"precedence"}
)  # fmt: skip


def sure_category(raw: bytes) -> str | None:
    """"updates" for a bounce/DSN, "forums" for discussion-list mail, else None."""
    fields = headers.fields(headers.head(raw), _WANTED)
    # Bounces first: a DSN about a list post is still a bounce.
    if fields.get(b"return-path", b"").replace(b" ", b"") == b"<>":
        return "updates"
    if b"multipart/report" in fields.get(b"content-type", b"").lower():
        return "updates"
    if b"mailer-daemon" in fields.get(b"from", b"").lower():
        return "updates"
    # A List-Id with List-Unsubscribe alone is a newsletter, not a list:
    # only the headers of discussion lists count.
    if (
        b"list-post" in fields
        or b"mailing-list" in fields
        or b"x-beenthere" in fields
        or b"x-mailman-version" in fields
        or fields.get(b"precedence", b"").lower() == b"list"
    ):
        return "forums"
    return None


def apply_override(result: Classification, category: str | None,
                   labels: frozenset[str] | None) -> Classification:
    """`result` with its category replaced by `category` when the model has it."""
    if category is None or category == result.category:
        return result
    if labels is None or category not in labels:
        return result
    return msgspec.structs.replace(result, category=category, score=_SURE)


__all__ = ["apply_override", "sure_category"]
