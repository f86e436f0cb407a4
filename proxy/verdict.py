"""The one place that turns outcomes into SMTP replies.

Every reply we originate carries an RFC 3463 enhanced status code (RFC 2034
ENHANCEDSTATUSCODES). Exception text never reaches the peer: our own failures
are always 4xx so the sending MTA keeps the mail and retries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from classifier.types import Classification
from proxy.milter import codec as milter

Action = Literal["accept", "tag", "quarantine", "reject", "tempfail", "error"]


class Verdict(msgspec.Struct, frozen=True):
    """What the pipeline decided for one message."""

    action: Action
    classification: Classification | None  # None: unclassified (classifier error)
    subject_tag: str = ""  # prefix for Subject when action == "tag"
    classifier_latency_ms: float = 0.0
    busy: bool = False  # classifier refused at once on a full queue (Overloaded)


# Replies we originate. Keep texts short and free of internals.
GREETING_DENIED = "554 5.7.1 Access denied"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
INSUFFICIENT_MEMORY = "452 4.3.1 Insufficient system storage, try again later"
LINE_TOO_LONG = "500 5.5.2 Line too long"
XFORWARD_DENIED = "550 5.7.0 Error: insufficient authorization"
XFORWARD_OK = "250 2.0.0 Ok"
XFORWARD_BAD = "501 5.5.4 Syntax: XFORWARD attribute=value..."
UPSTREAM_UNREACHABLE = "451 4.4.1 Next hop unreachable, try again later"
UPSTREAM_FAILED = "451 4.4.2 Next hop connection failed, try again later"
UPSTREAM_TIMEOUT = "451 4.4.2 Next hop timed out, try again later"
# DESIGN.md 4: a full pool answers at once with 4.3.2 (system not accepting).
POOL_FULL = "451 4.3.2 Next hop connections busy, try again later"
# A parked transaction's replay got a different answer (proxy/smtp/envelope.py).
TRANSACTION_LOST = "451 4.3.0 Transaction could not be resumed, try again later"
# RFC 5321 2.3.8; Postfix smtpd_forbid_bare_newline_reject_code is 550 too.
BARE_LINE_ENDING = "550 5.5.2 Bare <CR> or <LF> in message data, lines must end in <CR><LF>"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
DATA_READ_FAILED = "421 4.3.0 Error reading message data, closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
POLICY_REJECT = "550 5.7.1 Message rejected by policy"
POLICY_TEMPFAIL = "451 4.7.1 Message deferred by policy, try again later"
# SMTP proxy mode has no hold queue: a quarantined message stays with the
# sending MTA (its deferred queue, where the postmaster can look) by a 4xx.
POLICY_HOLD = "451 4.7.1 Message held by policy, try again later"
CLASSIFIER_TEMPFAIL = "451 4.7.1 Message could not be classified, try again later"
# DESIGN.md 4: a full queue answers at once with 4.3.2 (system not accepting).
CLASSIFIER_BUSY = "451 4.3.2 Classifier busy, try again later"

_HAS_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_CODE_LINE = re.compile(r"^([2-5]\d\d)([ -])(.*)$", re.S)

# Enhanced codes for the bare replies aiosmtpd produces itself (RFC 3463).
_DEFAULT_DETAIL = {
    "500": "5.5.2",  # syntax error, command unrecognised
    "501": "5.5.4",  # invalid arguments
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.0.0",
    "552": "5.3.4",  # message too big
    "553": "5.1.3",  # bad address syntax
    "554": "5.0.0",
    "555": "5.5.4",  # MAIL/RCPT parameters not recognised
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
}


def with_enhanced(reply: str) -> str:
    """Insert an enhanced status code into a one-line reply that lacks one.

    The greeting (220), 354 and 334 carry none per RFC 2034 section 3.
    """
    m = _CODE_LINE.match(reply)
    if m is None:
        return reply
    code, sep, text = m.groups()
    if code in ("220", "354", "334") or _HAS_ENHANCED.match(text):
        return reply
    detail = _DEFAULT_DETAIL.get(code) or f"{code[0]}.0.0"
    return f"{code}{sep}{detail} {text}"


def passthrough(code: int, message: str) -> str:
    """The next hop's reply, handed to our client with its own code and text.

    Multi-line replies keep every line. A 421 from the next hop means *it* is
    closing, not us: the client gets a 451 so its session stays usable.
    """
    if code == 421:
        return UPSTREAM_FAILED
    lines = message.splitlines() or [""]
    out = []
    detail = ""
    for i, text in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        if _HAS_ENHANCED.match(text):
            detail = ""
        else:
            detail = _DEFAULT_DETAIL.get(str(code)) or f"{str(code)[0]}.0.0"
            text = f"{detail} {text}".rstrip()
        out.append(f"{code}{sep}{text}")
    return "\r\n".join(out)


def reply_for_verdict(verdict: Verdict) -> str | None:
    """A reply that replaces relaying, or None when the message goes on."""
    if verdict.action == "reject":
        return POLICY_REJECT
    if verdict.action == "tempfail":
        return POLICY_TEMPFAIL
    if verdict.action == "quarantine":
        return POLICY_HOLD
    if verdict.action == "error":
        return CLASSIFIER_BUSY if verdict.busy else CLASSIFIER_TEMPFAIL
    return None


def reply_code(reply: str) -> int:
    try:
        return int(reply[:3])
    except ValueError:
        return 0


# -- milter (Postfix MILTER_README; libmilter smfi_insheader/smfi_chgheader) -----


def quarantine_reason(verdict: Verdict) -> str:
    """The text Postfix logs with milter-hold (no addresses, no content)."""
    c = verdict.classification
    if c is None:
        return "triaged: held by policy"
    return f"triaged: category {c.category} score {c.score:.3f}"


def milter_response(
    verdict: Verdict,
    fields: Sequence[tuple[str, str]],
    headers: Sequence[tuple[bytes, bytes]],
    remove: Iterable[str],
    *,
    leading_space: bool,
) -> tuple[list[milter.Modification], milter.Reply]:
    """The end-of-message answer: header changes, then the final reply.

    `headers` are (name, value) as the MTA sent them; `leading_space` is
    SMFIP_HDR_LEADSPC (values carry their own leading space, ours must too).
    Forged copies of our fields go first, by CHGHEADER with an empty value at
    their per-name index (1-based, names compared case-insensitively, also
    with whitespace before the colon), highest index first so no deletion
    shifts another. Our fields then go in at index 0, last one first, so they
    end up on top in `fields` order (above any DKIM-Signature, like the SMTP
    path). A refusal carries no changes.
    """
    refusal = reply_for_verdict(verdict) if verdict.action != "quarantine" else None
    if refusal is not None:
        return [], milter.ReplyCode(refusal)
    lead = " " if leading_space else ""
    mods: list[milter.Modification] = []
    names = {n.lower().encode() for n in remove}
    seen: dict[bytes, int] = {}
    deletions: list[milter.ChangeHeader] = []
    subject: tuple[bytes, bytes] | None = None
    for name, value in headers:
        key = name.strip().lower()
        seen[key] = seen.get(key, 0) + 1
        if key in names:
            deletions.append(milter.ChangeHeader(seen[key], name, b""))
        elif key == b"subject" and subject is None:
            subject = (name, value)
    deletions.sort(key=lambda d: -d.index)
    mods.extend(deletions)
    tag = verdict.subject_tag if verdict.action == "tag" else ""
    if tag:
        if subject is None:
            mods.append(milter.AddHeader("Subject", lead + tag))
        elif tag.encode().lower() not in subject[1].lower():  # don't stack tags on replies
            new = lead.encode() + tag.encode() + b" " + subject[1].lstrip(b" ")
            mods.append(milter.ChangeHeader(1, subject[0], new))
    for field_name, field_value in reversed(fields):
        # A CR or LF in a value (a model name, say) must not start a new field.
        mods.append(milter.InsertHeader(0, field_name, lead + " ".join(field_value.splitlines())))
    if verdict.action == "quarantine":
        mods.append(milter.Quarantine(quarantine_reason(verdict)))
    return mods, milter.CONTINUE
