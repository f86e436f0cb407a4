"""Authentication-Results from a trusted verifier, as a fixed adjustment of the spam score.

triaged does not verify DKIM, SPF or DMARC itself; a verifier upstream does
(OpenDKIM, OpenDMARC, rspamd, the receiving MTA) and records its findings in
an Authentication-Results field (RFC 8601). Anyone can write such a field, so
only fields whose authserv-id the site configured
(`classifier.trusted_authserv_ids`) are read; the default is none, and then
this module changes nothing (RFC 8601 section 5: a receiver must not trust
results it cannot attribute to its own border).

Why an adjustment and not a model feature: the training corpora carry no
trustworthy results (the 1999-2002 mail predates DKIM, and the modern sets
were verified by receivers we do not know), so a learned weight would learn
the era of the data ("signed = ham"), which spam sent through abused ESPs
exploits (a quarter of phishing-pot has dmarc=pass). Mature filters score
authentication by hand too (rspamd's DMARC_POLICY_REJECT, SpamAssassin's
DKIM_INVALID). So: a failure a trusted verifier saw adds fixed log-odds to the
spam score; a pass adds nothing (it proves who sent it, not that it is wanted).
"""

from __future__ import annotations

import math
import re
from typing import Final

import msgspec

from classifier import headers
from classifier.types import Classification

# Log-odds added to the spam score per failed method (first result per method
# in the topmost trusted field). dmarc=fail: the From domain's owner says this
# mail is not theirs; spf/dkim fail alone are weaker (forwarders break them).
SPAM_LOG_ODDS: Final = {"dmarc": 2.0, "spf": 0.7, "dkim": 0.7}
_FAIL: Final = frozenset({"fail", "permerror"})  # softfail/neutral/none: no opinion
_COMMENT = re.compile(r"\([^()]*\)")
_RESULT = re.compile(r"(?:^|;)\s*(dmarc|dkim|spf)\s*=\s*([a-z]+)")
_NAME: Final = b"authentication-results"


class AuthResults(msgspec.Struct, frozen=True):
    """What a trusted verifier found: method -> result ("pass", "fail", ...)."""

    authserv_id: str
    results: dict[str, str]


def trusted_results(raw: bytes, trusted: frozenset[str]) -> AuthResults | None:
    """The topmost Authentication-Results field whose authserv-id is trusted, or None.

    Topmost: the one our own border added last; fields further down came from
    hops before it (or from the sender) and are not ours to believe. The border
    must delete incoming fields that claim its authserv-id (RFC 8601 section 5;
    OpenDMARC and rspamd do), else a sender could forge one when it adds none."""
    if not trusted:
        return None
    block = headers.head(raw, 65536)
    if _NAME not in block.lower():
        return None  # the usual case without a verifier upstream
    for name, raw_value in headers.FIELD.findall(block):
        if name.lower() != _NAME:
            continue
        value = headers.unfold(raw_value).decode("latin-1").lower()
        value = _COMMENT.sub("", value)
        ident, _, rest = value.partition(";")
        # authserv-id [version]; RFC 8601 2.2
        parts = ident.split()
        if not parts or parts[0] not in trusted:
            continue
        results: dict[str, str] = {}
        for method, result in _RESULT.findall(";" + rest):
            results.setdefault(method, result)
        return AuthResults(parts[0], results)
    return None


def spam_log_odds(found: AuthResults | None) -> float:
    if found is None:
        return 0.0
    return sum(w for method, w in SPAM_LOG_ODDS.items() if found.results.get(method) in _FAIL)


def adjust(result: Classification, raw: bytes, trusted: frozenset[str], threshold: float) -> Classification:
    """`result` with its spam score moved by what a trusted verifier found."""
    if not trusted or result.spam_score is None:
        return result
    shift = spam_log_odds(trusted_results(raw, trusted))
    if shift == 0.0:
        return result
    p = min(max(result.spam_score, 1e-6), 1 - 1e-6)
    q = 1.0 / (1.0 + math.exp(-(math.log(p / (1 - p)) + shift)))
    return msgspec.structs.replace(result, spam_score=round(q, 4), spam=q >= threshold)


__all__ = ["SPAM_LOG_ODDS", "AuthResults", "adjust", "spam_log_odds", "trusted_results"]
