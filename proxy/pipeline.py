"""One `decide()` for every front end: classify, apply policy.

The classification deadline (`classifier.timeout_ms`) belongs to the
classifier, which knows about its queue and counts its misses
(triaged_classifier_timeouts); an ONNX classifier answers a miss with its
header-rules fallback. `decide()` only keeps a safety net far behind it, for
a classifier that ignores its own deadline (a bug): the net then fires alone,
so a miss is never counted twice.

Front ends (SMTP now, milter later) call `decide(raw)` for a Verdict, turn it
into headers with `stamp_fields()`, and report the outcome with `finish()`,
which logs the canonical line and hands a TransactionRecord to every sink.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Literal

import structlog

from classifier import headers
from classifier.types import Classification, Classifier, ClassifierError, Overloaded
from proxy.settings import Action, Settings
from proxy.transaction import TransactionRecord, TransactionSink
from proxy.verdict import Verdict

log = structlog.get_logger("triaged")

# The safety net fires this long after the classifier's own deadline would
# have: late enough that a working classifier always answers first.
SAFETY_NET_FACTOR = 2.0
SAFETY_NET_MIN_S = 1.0

# A quarantine beats a tag (the message is held, not delivered) and loses to
# tempfail and reject (nothing is taken in).
_SEVERITY: dict[str, int] = {"accept": 0, "tag": 1, "quarantine": 2, "tempfail": 3, "reject": 4}


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        sinks: Sequence[TransactionSink] = (),
    ) -> None:
        self.settings = settings
        self.classifier = classifier
        self.sinks = list(sinks)
        timeout_s = settings.classifier.timeout_ms / 1000.0
        self._safety_net_s = max(timeout_s * SAFETY_NET_FACTOR, timeout_s + SAFETY_NET_MIN_S)
        st = settings.stamping
        # Incoming copies of every field we stamp are removed (no forging).
        self.our_fields = (
            st.category_header,
            st.score_header,
            st.spam_header,
            st.spam_score_header,
            st.model_header,
        )
        self.classifier_errors = 0

    async def decide(self, raw: bytes) -> Verdict:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._safety_net_s):
                result = await self.classifier.classify(raw)
        except TimeoutError:
            # Only a classifier that overran its own deadline gets here.
            log.error("classifier_overran_deadline", waited_s=self._safety_net_s)
            return self._on_error("TimeoutError", started)
        except ClassifierError as exc:
            return self._on_error(type(exc).__name__, started, busy=isinstance(exc, Overloaded))
        except Exception as exc:  # a classifier bug must not lose mail
            log.exception("classifier_crashed", error=type(exc).__name__)
            return self._on_error(type(exc).__name__, started)
        latency_ms = (time.perf_counter() - started) * 1000.0
        action, tag = self._policy(result)
        return Verdict(
            action=action,
            classification=result,
            subject_tag=tag,
            classifier_latency_ms=latency_ms,
        )

    def _on_error(self, reason: str, started: float, *, busy: bool = False) -> Verdict:
        self.classifier_errors += 1
        policy = self.settings.policy.on_classifier_error
        log.warning("classifier_error", reason=reason, policy=policy)
        return Verdict(
            action="accept" if policy == "accept" else "error",
            classification=None,
            classifier_latency_ms=(time.perf_counter() - started) * 1000.0,
            busy=busy,
        )

    def _policy(self, c: Classification) -> tuple[Action, str]:
        p = self.settings.policy
        category_action: Action = p.category_actions.get(c.category, "accept")
        spam_action: Action = p.spam_action if c.spam else "accept"
        action = max(category_action, spam_action, key=_SEVERITY.__getitem__)
        if action != "tag":
            return action, ""
        tags = []
        if spam_action == "tag":
            tags.append(p.spam_subject_tag)
        if category_action == "tag":
            tags.append(p.subject_tag.replace("{category}", c.category))
        return "tag", " ".join(t for t in tags if t)

    def stamp_fields(self, verdict: Verdict) -> list[tuple[str, str]]:
        c = verdict.classification
        if c is None:
            return []  # unclassified: no category headers, never a guess
        st = self.settings.stamping
        fields = [(st.category_header, c.category), (st.score_header, f"{c.score:.3f}")]
        if c.spam is not None:
            fields.append((st.spam_header, "yes" if c.spam else "no"))
            if c.spam_score is not None:
                fields.append((st.spam_score_header, f"{c.spam_score:.3f}"))
        fields.append((st.model_header, c.model))
        return fields

    def finish(
        self,
        *,
        front_end: Literal["smtp", "milter"],
        peer: str,
        queue_id: str,
        message_id: str,
        client_address: str,
        sender: str,
        recipients: Sequence[str],
        size_bytes: int,
        verdict: Verdict | None,
        outcome: str,
        reply_code: int,
        started: float,
    ) -> TransactionRecord:
        """Log the canonical line and hand the record to the sinks.

        `outcome` is the verdict's action, or "error" when relaying failed.
        """
        c = verdict.classification if verdict else None
        total_ms = (time.perf_counter() - started) * 1000.0
        record = TransactionRecord(
            time=time.time(),
            front_end=front_end,
            queue_id=queue_id,
            message_id=message_id,
            client_address=client_address,
            sender=sender,
            recipients=tuple(recipients),
            size_bytes=size_bytes,
            category=c.category if c else None,
            score=c.score if c else None,
            spam=c.spam if c else None,
            spam_score=c.spam_score if c else None,
            model=c.model if c else None,
            classifier_latency_ms=verdict.classifier_latency_ms if verdict else 0.0,
            total_latency_ms=total_ms,
            verdict=outcome,
            reply_code=reply_code,
            shadow=c.shadow if c else None,
        )
        # The canonical line: no addresses, no content (DESIGN.md 8).
        log.info(
            "transaction",
            peer=peer,
            client=client_address,
            queue_id=queue_id,
            category=record.category,
            score=None if record.score is None else round(record.score, 3),
            spam=record.spam,
            size=size_bytes,
            rcpts=len(recipients),
            latency_ms=round(total_ms, 2),
            verdict=outcome,
            reply=reply_code,
        )
        for sink in self.sinks:
            try:
                sink.record(record)
            except Exception:  # a sink must never take mail down with it
                log.exception("sink_failed", sink=type(sink).__name__)
        return record


def message_id_of(raw: bytes) -> str:
    """Raw Message-ID value of a message, unfolded ("" when absent)."""
    value = headers.field(headers.head(raw), b"message-id")
    return "" if value is None else value.decode("ascii", "replace")
