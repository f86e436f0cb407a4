"""Feedback as events: `triaged feedback` ships each user's label to the events
topic, and `triaged feedback --from-kafka` reads them into a learner host's store.

Producer side. `triaged feedback` is a short-lived process per IMAPSieve move,
not the server, so it does not touch the server's event spool (one owner per
spool directory, proxy/spool.py). It has a spool of its own
(`learning.event_spool_dir`, the same segment format): under an exclusive
flock beside it (concurrent moves queue for it, they do not fail), the new
event is appended and fsynced first, then everything pending is sent to Kafka
within `learning.event_timeout_s` and acknowledged. Kafka down: the events
wait in the spool for the next feedback (or `triaged feedback --ship-events`,
e.g. from the learn timer), and for a minute after a failure no connection is
tried, so a user's moves do not each wait out the timeout. At-least-once: a
consumer deduplicates (the store does, by Message-ID hash and body hash).

Consumer side. Every partition of the topic is read from the offsets saved in
the store directory (`kafka-offsets.json`, written after the items are in the
store: a crash repeats, never skips); per-message events (no `type`) are
skipped; a feedback event becomes a feature item of the store
(classifier.learning.feature_items). Offsets are ours, not a consumer group's,
so no group coordinator is needed and a learner can be re-pointed by
deleting the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from proxy.events import (
    FEEDBACK_TYPE,
    SCHEMA_VERSION,
    FeedbackEvent,
    decode_feedback_event,
    default_instance_id,
)
from proxy.spool import Spool

log = structlog.get_logger("triaged.feedback")

RETRY_AFTER_S = 60.0  # after a failed ship, moves only spool for this long
_CHUNK = 500
_OFFSETS = "kafka-offsets.json"
_encoder = msgspec.json.Encoder()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def message_id_key(message_id: str) -> str:
    """The store's key for a message known by features only: the Message-ID's hash,
    as a feedback event carries it (so both dedupe alike), never the Message-ID."""
    mid = message_id.strip()
    return "sha:" + _digest(mid) if mid else ""


def user_field(user: str, mode: str, secret: str) -> str:
    if mode == "plain":
        return user
    if secret:
        return hmac.new(secret.encode(), user.strip().lower().encode(), hashlib.sha256).hexdigest()[:32]
    return _digest(user.strip().lower()) if user else ""


def build_event(item: Any, ids: Any, params: Any, settings: Any) -> FeedbackEvent:
    """The event for a stored FeedbackItem and its feature ids (message unstamped)."""
    from classifier.learning.feature_items import params_digest, split_ids

    struct, text = split_ids(ids, params)
    mid = item.message_id.strip()
    return FeedbackEvent(
        schema=SCHEMA_VERSION,
        type=FEEDBACK_TYPE,
        id=f"{os.urandom(8).hex()}-fb",
        time=item.time,
        instance=default_instance_id(),
        message_id_hash=_digest(mid) if mid else "",
        body_hash=item.body_hash,
        user=user_field(item.user, settings.learning.event_user, settings.events.pseudonymize_secret),
        label=item.label,
        kind=item.kind,
        decided=item.decided,
        feature_version=params.version,
        feature_params=params_digest(params),
        struct_ids=struct,
        text_ids=text,
    )


# -- producer ------------------------------------------------------------------------


@contextlib.contextmanager
def _spool(settings: Any) -> Iterator[Spool]:
    """The CLI's own spool, held under a blocking flock (one CLI at a time)."""
    d = Path(settings.learning.event_spool_dir)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d.parent / (d.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        ev = settings.events
        spool = Spool(d, max_bytes=ev.spool_max_bytes, segment_bytes=ev.spool_segment_bytes,
                      fsync="always")  # fmt: skip
        spool.open()
        try:
            yield spool
        finally:
            spool.close()
    finally:
        os.close(fd)


def _retry_file(settings: Any) -> Path:
    return Path(settings.learning.event_spool_dir) / "retry-after"


def spool_and_ship(
    events: Sequence[FeedbackEvent], settings: Any, *, force: bool = False
) -> dict[str, int]:
    """Append `events` to the CLI's spool, then ship what is pending (unless a
    recent failure says wait; `force` tries anyway). Returns {"spooled",
    "sent", "pending"} counts. OSError when the spool cannot take them."""
    out = {"spooled": 0, "sent": 0, "pending": 0}
    with _spool(settings) as spool:
        recs = [((e.message_id_hash or e.body_hash or e.id).encode(), _encoder.encode(e),
                 int(e.time * 1000)) for e in events]  # fmt: skip
        if recs:
            out["spooled"] = spool.append(recs)
            if out["spooled"] != len(recs):
                raise OSError(f"{settings.learning.event_spool_dir}: event spool full or failing")
        retry = _retry_file(settings)
        try:
            wait = float(retry.read_text()) - time.time()
        except (OSError, ValueError):
            wait = 0.0
        if spool.pending and (force or wait <= 0):
            sent, error = asyncio.run(_drain(spool, settings))
            out["sent"] = sent
            if error:
                retry.write_text(str(time.time() + RETRY_AFTER_S))
                log.warning("feedback_events_not_shipped", error=error, pending=spool.pending)
            else:
                retry.unlink(missing_ok=True)
        out["pending"] = spool.pending
    return out


async def _drain(spool: Spool, settings: Any) -> tuple[int, str]:
    """Send the spool's records in order under one deadline; ack what Kafka took."""
    from aiokafka import AIOKafkaProducer

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    ev = settings.events
    producer = AIOKafkaProducer(
        bootstrap_servers=list(ev.bootstrap_servers), client_id=ev.client_id,
        acks="all" if ev.acks == "all" else int(ev.acks),
        request_timeout_ms=int(settings.learning.event_timeout_s * 1000),
    )  # fmt: skip
    sent, error = 0, ""
    try:
        async with asyncio.timeout(settings.learning.event_timeout_s):
            await producer.start()
            while recs := spool.read(_CHUNK):
                futs = [await producer.send(ev.topic, r.value, key=r.key, timestamp_ms=r.timestamp_ms)
                        for r in recs]  # fmt: skip
                await asyncio.gather(*futs)
                spool.ack(recs[-1], len(recs))
                sent += len(recs)
    except Exception as exc:  # Kafka down, slow or refusing: the spool keeps them
        error = str(exc)[:200] or type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await producer.stop()
    return sent, error


# -- consumer ------------------------------------------------------------------------


def _load_offsets(store_dir: Path) -> dict[str, int]:
    try:
        data = json.loads((store_dir / _OFFSETS).read_text())
        return {str(k): int(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _save_offsets(store_dir: Path, offsets: dict[str, int]) -> None:
    from classifier.learning.gate import atomic_write

    atomic_write(store_dir / _OFFSETS, json.dumps(offsets, sort_keys=True).encode())


async def consume(store: Any, settings: Any, *, idle_s: float = 2.0, timeout_s: float = 60.0) -> dict[str, int]:
    """Read feedback events from events.topic into `store` until the topic has
    been quiet for `idle_s` (or `timeout_s` passed). Counts of what happened."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    ev = settings.events
    counts = {"added": 0, "duplicates": 0, "skipped": 0, "bad": 0}
    offsets = _load_offsets(store.path)
    consumer = AIOKafkaConsumer(bootstrap_servers=list(ev.bootstrap_servers),
                                client_id=ev.client_id + "-learner", enable_auto_commit=False,
                                auto_offset_reset="earliest")  # fmt: skip
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    async with asyncio.timeout(timeout_s + 5.0):
        await consumer.start()
    try:
        parts: set[int] | None = None
        while not parts and loop.time() < end:
            await consumer.topics()  # fresh metadata
            parts = consumer.partitions_for_topic(ev.topic)
            if not parts:
                await asyncio.sleep(0.2)
        if not parts:
            raise RuntimeError(f"topic {ev.topic!r} not found on {', '.join(ev.bootstrap_servers)}")
        tps = [TopicPartition(ev.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        for tp in tps:
            if str(tp.partition) in offsets:
                consumer.seek(tp, offsets[str(tp.partition)])
            else:
                await consumer.seek_to_beginning(tp)
        quiet_since = loop.time()
        while loop.time() < end:
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                if loop.time() - quiet_since >= idle_s:
                    break
                continue
            quiet_since = loop.time()
            for tp, msgs in batch.items():
                for m in msgs:
                    _take(store, m.value or b"", counts)
                    offsets[str(tp.partition)] = m.offset + 1
            _save_offsets(store.path, offsets)  # after the store has them
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await consumer.stop()
    return counts


def _take(store: Any, value: bytes, counts: dict[str, int]) -> None:
    if b'"type":"feedback"' not in value:  # a per-message event: not ours (cheap test first)
        counts["skipped"] += 1
        return
    try:
        e = decode_feedback_event(value)
    except msgspec.DecodeError:
        counts["bad"] += 1
        return
    if e.type != FEEDBACK_TYPE or e.kind not in ("correction", "confirmation"):
        counts["bad"] += 1
        return
    # The payload keeps the event's digest: ids hashed for other features are
    # kept but not trained on (learn counts them as stale), never mixed in.
    from classifier.learning.feature_items import FeatureIds

    payload = msgspec.msgpack.encode(FeatureIds(e.feature_params, e.struct_ids, e.text_ids))
    item = store.add_features(
        payload, label=e.label, user=e.user, kind=e.kind, decided=e.decided, when=e.time,
        message_id=("sha:" + e.message_id_hash) if e.message_id_hash else "",  # = message_id_key
        body_hash=e.body_hash,
    )  # fmt: skip
    counts["added" if item is not None else "duplicates"] += 1


__all__ = ["build_event", "consume", "message_id_key", "spool_and_ship", "user_field"]
