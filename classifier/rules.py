"""Header-rule classifier ("rules/1"): the first classifier and later the fallback.

It reads only the header block, with classifier.headers instead of the email
package: it is on every message's path and the whole parse costs a few
microseconds. Rules, first match wins:

1. bounces (null Return-Path, multipart/report, MAILER-DAEMON) -> updates
2. mailing-list headers (List-Post, Mailing-List, Mailman's X-BeenThere,
   List-Id without List-Unsubscribe, Precedence: list) -> forums
3. Auto-Submitted (RFC 3834), no-reply/automated senders -> updates
4. List-Unsubscribe without List-Post, Precedence: bulk, a bulk-mailer
   X-Mailer, a promotional sender (news@, offers@, ...) -> promotions
5. a "[list] " Subject tag                           -> forums
6. otherwise                                         -> primary
"""

from __future__ import annotations

import re

from classifier import headers
from classifier.types import Classification

MODEL = "rules/1"

# Header names the rules look at (lower case).
_WANTED = frozenset(
    {
        b"list-id",
        b"list-post",
        b"list-unsubscribe",
        b"mailing-list",
        b"precedence",
        b"auto-submitted",
        b"from",
        b"sender",
        b"return-path",
        b"content-type",
        b"x-mailer",
        b"x-auto-response-suppress",
        b"subject",
        b"x-beenthere",
        b"x-mailman-version",
    }
)

_AUTOMATED_LOCAL = re.compile(
    rb"(?:^|[<\s\"])(?:no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer-daemon|postmaster|"
    rb"notifications?|notify|alerts?|auto[-_.]?(?:reply|confirm)|rss(?:feeds?)?|feeds?|"
    rb"root|cron|daemon|errata)@",
    re.I,
)
_PROMO_LOCAL = re.compile(
    rb"(?:^|[<\s\"])(?:news(?:letters?)?|offers?|deals?|promo(?:tions?)?|marketing|"
    rb"specials?|sales|subscriptions?)@",
    re.I,
)
# "[list-name] subject", the tag Mailman and Majordomo put on list posts.
_SUBJECT_TAG = re.compile(rb"^(?:(?:re|fwd?|aw)\s*:\s*)*\[[^\]\s]{2,40}\]", re.I)
_MAILER_DAEMON = re.compile(rb"mailer-daemon", re.I)
_BULK_MAILER = re.compile(
    rb"mailchimp|sendgrid|sendinblue|brevo|constant ?contact|mailerlite|campaign ?monitor|"
    rb"klaviyo|hubspot|marketo|exacttarget|salesforce marketing|mailjet|phplist|"
    rb"acoustic|silverpop|emarsys|cheetahmail|responsys|listrak|getresponse|aweber|"
    rb"icontact|benchmark email|sailthru|braze|customer\.io|mailgun|postmark|sparkpost",
    re.I,
)


def header_fields(raw: bytes) -> dict[bytes, bytes]:
    """The wanted header fields of `raw`, unfolded; first occurrence wins.

    Where the header ends and what a field is: classifier.headers (LF or CRLF,
    whitespace before the colon, folding), the same reader stamping uses.
    """
    return headers.fields(headers.head(raw), _WANTED)


def classify_headers(fields: dict[bytes, bytes]) -> tuple[str, float]:
    sender = fields.get(b"from", b"")
    # Bounces first: a DSN about a list post is still a bounce.
    if fields.get(b"return-path", b"").replace(b" ", b"") == b"<>":
        return "updates", 0.9  # null sender: a bounce or other DSN (RFC 5321 4.5.5)
    if b"multipart/report" in fields.get(b"content-type", b"").lower():
        return "updates", 0.9  # RFC 6522 delivery and disposition reports
    if _MAILER_DAEMON.search(sender):
        return "updates", 0.9
    precedence = fields.get(b"precedence", b"").lower()
    has_unsub = b"list-unsubscribe" in fields
    if (
        b"list-post" in fields
        or b"mailing-list" in fields
        or b"x-beenthere" in fields  # Mailman
        or b"x-mailman-version" in fields
        or (b"list-id" in fields and not has_unsub)
        or precedence == b"list"
    ):
        return "forums", 0.9
    auto = fields.get(b"auto-submitted", b"").lower()
    if auto and not auto.startswith(b"no"):
        return "updates", 0.9  # RFC 3834
    if _AUTOMATED_LOCAL.search(sender):
        return "updates", 0.8
    if b"x-auto-response-suppress" in fields:
        return "updates", 0.7
    if has_unsub or precedence in (b"bulk", b"junk"):
        return "promotions", 0.8
    if _BULK_MAILER.search(fields.get(b"x-mailer", b"")) or _PROMO_LOCAL.search(sender):
        return "promotions", 0.7
    if _SUBJECT_TAG.match(fields.get(b"subject", b"")):
        return "forums", 0.6  # a list post that reached us directly (Cc)
    return "primary", 0.6


class RulesClassifier:
    """The Classifier protocol over header rules. No spam opinion."""

    model = MODEL

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def classify_now(self, raw: bytes) -> Classification:
        category, score = classify_headers(header_fields(raw))
        return Classification(category=category, score=score, model=MODEL)

    async def classify(self, raw: bytes) -> Classification:
        return self.classify_now(raw)
