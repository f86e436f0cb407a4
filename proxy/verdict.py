"""The one place that turns outcomes into SMTP replies.

Every reply we originate carries an RFC 3463 enhanced status code (RFC 2034
ENHANCEDSTATUSCODES). Exception text never reaches the peer: our own failures
are always 4xx so the sending MTA keeps the mail and retries.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from classifier.types import Classification

Action = Literal["accept", "tag", "reject", "tempfail", "error"]


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
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
POLICY_REJECT = "550 5.7.1 Message rejected by policy"
POLICY_TEMPFAIL = "451 4.7.1 Message deferred by policy, try again later"
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
    if verdict.action == "error":
        return CLASSIFIER_BUSY if verdict.busy else CLASSIFIER_TEMPFAIL
    return None


def reply_code(reply: str) -> int:
    try:
        return int(reply[:3])
    except ValueError:
        return 0
