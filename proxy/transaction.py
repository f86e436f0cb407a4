"""What the pipeline knows about one finished transaction, handed to sinks
(the event shipper, metrics). Facts only; privacy rules are the sink's job."""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

from classifier.types import ShadowVerdict


class TransactionRecord(msgspec.Struct, frozen=True):
    time: float  # Unix time the transaction ended
    front_end: Literal["smtp", "milter"]
    queue_id: str  # Postfix queue id (XFORWARD/milter) or our own transaction id
    message_id: str  # raw Message-ID header value, "" when absent
    client_address: str  # from PROXY or XFORWARD when present, else the peer
    sender: str  # envelope MAIL FROM (the sink strips or pseudonymises it)
    recipients: tuple[str, ...]  # accepted envelope recipients
    size_bytes: int
    category: str | None  # None: unclassified (classifier error)
    score: float | None
    spam: bool | None
    spam_score: float | None
    model: str | None
    classifier_latency_ms: float
    total_latency_ms: float
    verdict: str  # accept | tag | quarantine | reject | tempfail | error
    reply_code: int  # the SMTP code the client got
    shadow: ShadowVerdict | None = None  # the shadow model's verdict (classifier/shadow.py)


class TransactionSink(Protocol):
    def record(self, record: TransactionRecord) -> None:
        """Must not block or raise: called on the mail path."""
