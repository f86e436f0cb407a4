"""One event per transaction, shipped to Kafka without ever touching the mail path.

The mail path calls `record()`: an O(1) append to a bounded deque, never an
await, never an exception. One task (`_run`) encodes events and feeds an
aiokafka producer; every await on Kafka sits under our own deadline, because
aiokafka's `send()` can wait `request_timeout_ms` for metadata and, with
idempotence on, retries a batch forever. When Kafka fails (or the deque passes
high_water) events go to the disk spool (proxy/spool.py); while the spool holds
anything, new events queue behind it there, so replay keeps the order.
Delivery is at-least-once: a chunk whose acks we did not get in time is spooled
and replayed, and the broker may have stored it already.

Privacy: no local parts and no content. Message-ID is hashed; addresses are
shipped only as keyed pseudonyms (HMAC-SHA256) when a secret is configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import msgspec
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import BrokerResponseError, KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.fsync_policy import FsyncedFile
from proxy.settings import ConfigError, EventsSettings
from proxy.spool import Spool
from proxy.transaction import TransactionRecord

log = structlog.get_logger("triaged.events")

SCHEMA_VERSION = 1
MAX_RECIPIENT_PSEUDONYMS = 100  # recipient_count carries the real number

# -- schema -------------------------------------------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one transaction looks like on the topic (JSON). Consumers should
    accept unknown fields: new ones may appear without a version bump;
    `schema` changes only when a field changes meaning or goes away."""

    schema: int
    id: str  # unique per event: deduplicate at-least-once deliveries on it
    time: float  # Unix time the transaction ended
    instance: str
    front_end: str  # smtp | milter
    queue_id: str
    message_id_hash: str  # sha256(Message-ID)[:32] hex, "" without one
    client_address: str  # from PROXY / XFORWARD when present, else the peer
    sender_domain: str  # lower case; "" for the null sender <>
    recipient_count: int
    size_bytes: int
    category: str | None
    score: float | None
    spam: bool | None
    spam_score: float | None
    model: str | None
    classifier_latency_ms: float
    total_latency_ms: float
    verdict: str
    reply_code: int
    # Only with events.pseudonymize_secret: HMAC-SHA256(secret, address)[:32].
    sender_pseudonym: str | None = None
    recipient_pseudonyms: list[str] | None = None
    # Only in shadow mode (classifier.shadow_model_path): the candidate's
    # verdict of the same message, never stamped. A learner host compares
    # it with `category` / `spam` (and with the users' feedback) before promotion.
    shadow_model: str | None = None
    shadow_category: str | None = None
    shadow_spam: bool | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def decode_event(data: bytes) -> Event:
    return _decoder.decode(data)


FEEDBACK_TYPE = "feedback"


class FeedbackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A user's label for a message (`triaged feedback`), on the same topic as the
    per-message events: `type` is "feedback" (per-message events have no `type`).
    No message, no address (convention 8): the model's hashed feature ids, so a
    learner host can train on it (proxy/feedback_events.py), and hashes."""

    schema: int
    type: str  # FEEDBACK_TYPE
    id: str  # unique per event: deduplicate at-least-once deliveries on it
    time: float  # when the user gave the label
    instance: str
    message_id_hash: str  # as Event.message_id_hash
    body_hash: str  # sha256 of the normalised body (the feedback store's dedup key)
    user: str  # learning.event_user: HMAC or sha256 of the user name, or the name
    label: str  # a category, "spam" or "ham"
    kind: str  # "correction" | "confirmation"
    decided: str | None  # what triaged had stamped (X-Triage-*), None if unstamped
    feature_version: int
    feature_params: str  # digest of every feature parameter the ids were hashed with
    struct_ids: list[int]
    text_ids: list[int]


_feedback_decoder = msgspec.json.Decoder(FeedbackEvent)


def decode_feedback_event(data: bytes) -> FeedbackEvent:
    return _feedback_decoder.decode(data)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def event_key(record: TransactionRecord) -> bytes:
    """Kafka key: one message's events land in one partition (in order)."""
    ident = record.message_id.strip() or record.queue_id
    return _digest(ident).encode()


def _domain(address: str) -> str:
    _, at, domain = address.rpartition("@")
    return domain.strip().rstrip(">").lower() if at else ""


class EventBuilder:
    """TransactionRecord -> Event under the privacy rules."""

    def __init__(self, instance_id: str, secret: str) -> None:
        self._instance = instance_id
        self._secret = secret.encode() if secret else b""
        # Event ids: random per process, then a counter (unique without a
        # syscall per event).
        self._id_prefix = os.urandom(8).hex() + "-"
        self._seq = 0

    def _pseudonym(self, address: str) -> str:
        msg = address.strip().lower().encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def build(self, r: TransactionRecord, mid_hash: str | None = None) -> Event:
        sender_p: str | None = None
        rcpt_p: list[str] | None = None
        if self._secret:
            sender_p = self._pseudonym(r.sender) if r.sender else ""
            rcpt_p = [self._pseudonym(a) for a in r.recipients[:MAX_RECIPIENT_PSEUDONYMS]]
        if mid_hash is None:
            mid = r.message_id.strip()
            mid_hash = _digest(mid) if mid else ""
        self._seq += 1
        return Event(
            schema=SCHEMA_VERSION,
            id=f"{self._id_prefix}{self._seq:x}",
            time=r.time,
            instance=self._instance,
            front_end=r.front_end,
            queue_id=r.queue_id,
            message_id_hash=mid_hash,
            client_address=r.client_address,
            sender_domain=_domain(r.sender),
            recipient_count=len(r.recipients),
            size_bytes=r.size_bytes,
            category=r.category,
            score=r.score,
            spam=r.spam,
            spam_score=r.spam_score,
            model=r.model,
            classifier_latency_ms=r.classifier_latency_ms,
            total_latency_ms=r.total_latency_ms,
            verdict=r.verdict,
            reply_code=r.reply_code,
            sender_pseudonym=sender_p,
            recipient_pseudonyms=rcpt_p,
            shadow_model=r.shadow.model if r.shadow else None,
            shadow_category=r.shadow.category if r.shadow else None,
            shadow_spam=r.shadow.spam if r.shadow else None,
        )

    def encode(self, r: TransactionRecord) -> bytes:
        return _encode(self.build(r))

    def encode_keyed(self, r: TransactionRecord) -> tuple[bytes, bytes]:
        """(Kafka key, JSON): the key is the Message-ID hash, computed once."""
        mid = r.message_id.strip()
        mid_hash = _digest(mid) if mid else ""
        key = mid_hash or _digest(r.queue_id)
        return key.encode(), _encode(self.build(r, mid_hash))


def _encode(ev: Event) -> bytes:
    try:
        return _encoder.encode(ev)
    except UnicodeEncodeError:
        # A field from the wire (e.g. an XFORWARD IDENT) decoded with
        # surrogateescape: ship it with "?" rather than lose the event.
        fixed = {
            k: v.encode("utf-8", "replace").decode() if isinstance(v, str) else v
            for k, v in msgspec.structs.asdict(ev).items()
        }
        return _encoder.encode(msgspec.structs.replace(ev, **fixed))


def default_instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- metrics ------------------------------------------------------------------


class EventMetrics:
    """Prometheus metrics of one event sink, on its own registry (like
    proxy/metrics.py: tests run several servers in a process). Expose them
    with `server_registry.register(sink.registry)`. The sinks also keep exact
    plain-int counters for tests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.sent = Counter("triaged_events_sent", "Events Kafka acknowledged straight from memory", registry=r)
        self.spooled = Counter("triaged_events_spooled", "Events written to the disk spool", registry=r)
        self.replayed = Counter("triaged_events_replayed", "Spooled events Kafka acknowledged", registry=r)
        self.written = Counter("triaged_events_written", "Events written to the JSON-lines file", registry=r)
        self.dropped = Counter(
            "triaged_events_dropped", "Events lost (queue full, spool full, after close)", ["reason"], registry=r
        )
        self.producer_errors = Counter(
            "triaged_events_producer_errors", "Kafka connect or delivery failures", registry=r
        )
        self.spool_bytes = Gauge("triaged_events_spool_bytes", "Bytes in the event spool", registry=r)
        self.queue_depth = Gauge("triaged_events_queue_depth", "Events waiting in memory", registry=r)


class DropCounter:
    """Counts drops exactly; logs at most once a minute (a full disk must not
    turn into a log flood)."""

    def __init__(self, what: str, metrics: EventMetrics) -> None:
        self.total = 0
        self._what = what
        self._metric = metrics.dropped
        self._unlogged = 0
        self._last_log = -1e18

    def flush_log(self) -> None:
        if self._unlogged:
            log.warning(f"{self._what}_dropped", count=self._unlogged, total=self.total)
            self._unlogged = 0

    def __call__(self, n: int, reason: str) -> None:
        self.total += n
        self._unlogged += n
        self._metric.labels(reason).inc(n)
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            log.warning(f"{self._what}_dropped", count=self._unlogged, reason=reason, total=self.total)
            self._unlogged = 0
            self._last_log = now


# -- what both sinks share ---------------------------------------------------------

_T = TypeVar("_T")


class QueuedSink:
    """The half EventShipper and JsonlSink share: `record()` appends to a
    bounded deque, one task (the subclass's) drains it, and blocking file I/O
    runs on ONE thread so that writes stay in order."""

    def __init__(
        self,
        settings: EventsSettings,
        *,
        instance_id: str | None,
        registry: CollectorRegistry | None,
        thread_name_prefix: str,
    ) -> None:
        self._s = settings
        self._builder = EventBuilder(instance_id or default_instance_id(), settings.pseudonymize_secret)
        self._m = EventMetrics(registry)
        self.registry = self._m.registry
        self._queue: deque[TransactionRecord] = deque()
        self._wake = asyncio.Event()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # record() drops from now on
        self._drop = DropCounter("events", self._m)
        self._first_at = 0.0  # monotonic time the oldest queued event arrived

    def record(self, record: TransactionRecord) -> None:
        """O(1), never awaits, never raises: called on the mail path."""
        if self._closed or len(self._queue) >= self._s.queue_size:
            self._drop(1, "closed" if self._closed else "queue_full")
            return
        if not self._queue:
            self._first_at = time.monotonic()  # the linger window starts
        self._queue.append(record)
        self._wake.set()

    @property
    def dropped(self) -> int:
        return self._drop.total

    def _begin_close(self) -> asyncio.Task[None] | None:
        """Stop record(); the started task left to flush, or None."""
        if self._closed:
            return None  # idempotent: the server may close twice on a failed start
        self._closed = True
        if self._task is None:  # never started: nothing would ever write these
            self._drop(len(self._queue), "closed")
            self._queue.clear()
        return self._task

    async def _sync_when_due(self, f: FsyncedFile) -> float | None:
        """fsync "interval" also when no further write comes: sync `f` if it
        is due, else the seconds until it is (None: nothing unsynced)."""
        if not f.dirty:
            return None
        due = f.last_sync + self._s.fsync_interval_s - time.monotonic()
        if due <= 0:
            await self._in_io(f.sync)
            return None
        return due

    async def _in_io(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)


# -- the Kafka shipper ----------------------------------------------------------

Pending = tuple[bytes, bytes, int]  # key, value, timestamp ms

_SEND_CHUNK = 512  # events per produce round (also bounds time we hold the loop)
_BATCH_BYTES = 256 * 1024  # aiokafka max_batch_size: one batch per partition per round
_MAX_EVENT_BYTES = 128 * 1024  # an event is ~0.5 KiB; 100 pseudonyms ~4 KiB
_SPOOL_CHUNK = 1024
_REPLAY_CHUNK = 1024
_SPOOL_LINGER_S = 0.2
_BACKOFF_MIN_S = 0.25
_BACKOFF_MAX_S = 10.0


class EventSink(Protocol):
    """A TransactionSink with a lifecycle: what the server constructs."""

    registry: CollectorRegistry  # its Prometheus metrics

    def record(self, record: TransactionRecord) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class EventShipper(QueuedSink):
    def __init__(
        self,
        settings: EventsSettings,
        *,
        instance_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(
            settings, instance_id=instance_id, registry=registry, thread_name_prefix="triaged-spool"
        )
        self._spool = Spool(
            settings.spool_dir,
            max_bytes=settings.spool_max_bytes,
            segment_bytes=settings.spool_segment_bytes,
            fsync=settings.fsync,
            fsync_interval_s=settings.fsync_interval_s,
        )
        self._producer: AIOKafkaProducer | None = None
        # Idempotence needs acks=all; it is dropped (logged) if the broker
        # refuses InitProducerId: Tansu 0.6 answers aiokafka's v0 request with
        # UNKNOWN_SERVER_ERROR.
        self._idempotent = settings.acks == "all"
        self._deadline_s = settings.request_timeout_s + settings.linger_ms / 1000 + 0.5
        self._retry_at = 0.0
        self._backoff_s = _BACKOFF_MIN_S
        self._step: asyncio.Timeout | None = None  # the deadline of the Kafka await in progress
        self._connecting: asyncio.Task[None] | None = None
        self._discards: set[asyncio.Task[None]] = set()
        self._close_deadline: float | None = None
        # Exact counts (the Prometheus counters are process-wide).
        self.sent = 0
        self.spooled = 0
        self.replayed = 0
        self.producer_errors = 0
        self.kafka_up = False
        # Kafka failed and has not come back: events go to the spool. Not set
        # while the first connection is being made (no needless disk writes).
        self._down = False
        self._last_error = ""  # why the last produce round failed, for the log
        self._linger_s = settings.linger_ms / 1000

    # -- counters (record() and dropped: QueuedSink) ---------------------------------

    @property
    def spool_pending(self) -> int:
        return self._spool.pending

    @property
    def spool_bytes(self) -> int:
        return self._spool.bytes

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def idempotent(self) -> bool:
        """False once the broker refused InitProducerId (then acks=all only)."""
        return self._idempotent

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        # aiokafka logs a warning per retry (every 100 ms) while a broker is
        # down; kafka_down / kafka_up above say it once per outage.
        logging.getLogger("aiokafka").setLevel(logging.ERROR)
        try:  # a missing codec library is a config error, not an endless outage
            await self._new_producer().stop()
        except KafkaError as exc:
            raise ConfigError(f"events.compression: {exc}") from None
        await self._in_io(self._spool.open)
        self._m.spool_bytes.set(self._spool.bytes)
        if self._spool.pending:
            log.info("event_spool_found", events=self._spool.pending, bytes=self._spool.bytes)
        self._task = asyncio.create_task(self._run(), name="event-shipper")

    async def close(self) -> None:
        """Flush to Kafka within close_timeout_s, spool what is left."""
        task = self._begin_close()
        if task is None:
            return
        loop = asyncio.get_running_loop()
        self._close_deadline = loop.time() + self._s.close_timeout_s
        step = self._step
        if step is not None and (step.when() or 1e18) > self._close_deadline:
            step.reschedule(self._close_deadline)
        self._wake.set()
        await task
        if self._discards:
            await asyncio.wait(self._discards)
        await self._in_io(self._spool.close)
        self._io.shutdown(wait=False)  # idle: the close above was its last job
        self._drop.flush_log()
        log.info(
            "event_shipper_closed",
            sent=self.sent,
            spooled=self.spooled,
            replayed=self.replayed,
            dropped=self.dropped,
            spool_pending=self._spool.pending,
        )

    # -- the shipper task -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._close_deadline is not None:
                    await self._finish()
                    return
                await self._step_once(loop)
            except Exception as exc:  # a bug here must not stop shipping for good
                log.exception("event_shipper_error", error=type(exc).__name__)
                self._lose_producer("internal", exc)
                await asyncio.sleep(_BACKOFF_MIN_S)

    async def _step_once(self, loop: asyncio.AbstractEventLoop) -> None:
        self._m.queue_depth.set(len(self._queue))
        if self._producer is None and self._connecting is None and loop.time() >= self._retry_at:
            # In its own task: a silent broker holds start() for the whole
            # deadline, and events must keep flowing to the spool meanwhile.
            self._connecting = asyncio.create_task(self._connect(), name="event-shipper-connect")
        if (
            self._producer is None
            and not self._down
            and self._connecting is not None
            and len(self._queue) <= self._s.high_water
        ):
            # First connection: hold events in memory rather than spool them.
            await asyncio.wait([self._connecting], timeout=0.25)
            return
        degraded = (
            self._producer is None
            or self._spool.pending > 0
            or len(self._queue) > self._s.high_water
        )
        if self._queue and len(self._queue) < _SEND_CHUNK and self._close_deadline is None:
            # Let a round collect events rather than pay a produce round (or
            # a thread hop to the disk) per message at low rates: linger_ms
            # for Kafka, longer for the spool (each hop wakes a thread under the GIL).
            linger = max(self._linger_s, _SPOOL_LINGER_S) if degraded else self._linger_s
            wait = self._first_at + linger - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                return
        if self._queue and degraded:
            await self._to_spool(self._take(_SPOOL_CHUNK))
        elif self._producer is not None and self._spool.pending > 0:
            await self._replay_chunk()
        elif self._queue:
            await self._ship(self._take(_SEND_CHUNK))
        else:
            await self._idle(loop)

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        timeouts: list[float] = []
        due = await self._sync_when_due(self._spool)
        if due is not None:
            timeouts.append(due)
        self._wake.clear()
        if self._queue or self._close_deadline is not None:
            return
        if self._producer is None and self._connecting is None:
            timeouts.append(max(self._retry_at - loop.time(), 0.0))
        timeout = min(timeouts) if timeouts else None
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _finish(self) -> None:
        """Closing: ship what is queued if Kafka is healthy, spool the rest."""
        assert self._close_deadline is not None
        loop = asyncio.get_running_loop()
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.wait([self._connecting])
        while (
            self._queue
            and self._producer is not None
            and self._spool.pending == 0
            and loop.time() < self._close_deadline
        ):
            await self._ship(self._take(_SEND_CHUNK))
        while self._queue:
            await self._to_spool(self._take(_SPOOL_CHUNK))
        if self._producer is not None:
            self._discard(self._producer)  # everything it had is acked or spooled
            self._producer = None
        self._m.queue_depth.set(0)

    def _take(self, n: int) -> list[Pending]:
        out: list[Pending] = []
        encode = self._builder.encode_keyed
        while self._queue and len(out) < n:
            rec = self._queue.popleft()
            try:
                key, value = encode(rec)
            except (msgspec.EncodeError, ValueError, UnicodeError):
                self._drop(1, "unencodable")
                continue
            if len(value) > _MAX_EVENT_BYTES:
                self._drop(1, "too_large")  # could never fit a Kafka batch: would block replay
                continue
            out.append((key, value, int(rec.time * 1000)))
        return out

    async def _to_spool(self, items: list[Pending]) -> None:
        if not items:
            return
        errors = self._spool.write_errors
        try:
            stored = await self._in_io(self._spool.append, items)
        except Exception as exc:  # append() handles OSError; anything else is a bug
            log.error("event_spool_error", error=type(exc).__name__)
            stored = 0
        self.spooled += stored
        self._m.spooled.inc(stored)
        self._m.spool_bytes.set(self._spool.bytes)
        if stored < len(items):
            full = self._spool.write_errors == errors
            self._drop(len(items) - stored, "spool_full" if full else "spool_write_error")

    async def _ship(self, items: list[Pending]) -> None:
        ok = await self._produce(items)
        good = sum(ok)
        self.sent += good
        self._m.sent.inc(good)
        if good < len(items):
            self._lose_producer("send", None)
            await self._to_spool([it for it, done in zip(items, ok, strict=True) if not done])

    async def _replay_chunk(self) -> None:
        recs = await self._in_io(self._spool.read, _REPLAY_CHUNK)
        if not recs:
            return
        ok = await self._produce([(r.key, r.value, r.timestamp_ms) for r in recs])
        # Ack only the unbroken prefix: the spool is FIFO. Acked records after
        # a failure are sent again later (at-least-once).
        n = ok.index(False) if False in ok else len(ok)
        if n:
            await self._in_io(self._spool.ack, recs[n - 1], n)
            self.replayed += n
            self._m.replayed.inc(n)
            self._m.spool_bytes.set(self._spool.bytes)
        if n < len(recs):
            self._lose_producer("replay", None)
        elif self._spool.pending == 0:
            log.info("event_spool_replayed", total=self.replayed)

    async def _produce(self, items: Sequence[Pending]) -> list[bool]:
        """Send under one deadline; which items Kafka acknowledged in time."""
        producer = self._producer
        assert producer is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + self._deadline_s
        if self._close_deadline is not None:
            end = min(end, self._close_deadline)
        # (ack future, indexes of the items in that batch)
        batches: list[tuple[asyncio.Future[Any], list[int]]] = []
        topic = self._s.topic
        try:
            async with asyncio.timeout_at(end) as self._step:
                # Our own batches, one per partition, partitioned by our key
                # (already a digest): per-message send() and aiokafka's
                # pure-Python murmur2 cost more CPU than the rest of the shipper.
                parts = sorted(await producer.partitions_for(topic))
                groups: dict[int, list[int]] = {}
                for i, (key, _, _) in enumerate(items):
                    groups.setdefault(parts[zlib.crc32(key) % len(parts)], []).append(i)
                for part, idxs in groups.items():
                    batch = producer.create_batch()
                    members: list[int] = []
                    for i in idxs:
                        key, value, ts = items[i]
                        if batch.append(timestamp=ts, key=key, value=value) is None:
                            # Full: submit it (send_batch waits while the
                            # partition's previous batch is still queued).
                            batches.append((await producer.send_batch(batch, topic, partition=part), members))
                            batch, members = producer.create_batch(), []
                            batch.append(timestamp=ts, key=key, value=value)  # fits: see _MAX_EVENT_BYTES
                        members.append(i)
                    batch.close()  # complete: we lingered already, aiokafka need not
                    batches.append((await producer.send_batch(batch, topic, partition=part), members))
                if batches:
                    await asyncio.wait([fut for fut, _ in batches])
        except TimeoutError:
            self._last_error = "no ack before the deadline"
        except KafkaError as exc:  # what was not acked is the caller's to spool
            self._last_error = str(exc)[:200]
        except Exception as exc:
            self._last_error = type(exc).__name__
            log.error("event_send_error", error=type(exc).__name__)
        finally:
            self._step = None
        ok = [False] * len(items)
        for fut, members in batches:
            if not fut.done():
                fut.add_done_callback(_retrieve)
            elif not fut.cancelled() and fut.exception() is None:
                for i in members:
                    ok[i] = True
            elif not fut.cancelled():
                self._last_error = str(fut.exception())[:200]
        return ok

    async def _connect(self) -> None:
        producer = self._new_producer()
        try:
            async with asyncio.timeout(self._deadline_s):
                await producer.start()
        except asyncio.CancelledError:
            self._discard(producer)
            raise
        except Exception as exc:
            self._discard(producer)
            if self._idempotent and isinstance(exc, BrokerResponseError):
                self._idempotent = False
                log.warning("kafka_idempotence_refused", error=str(exc)[:200])
            else:
                self._lose_producer("connect", exc)
        else:
            self._producer = producer
            self._down = False
            self._backoff_s = _BACKOFF_MIN_S
            if not self.kafka_up:
                self.kafka_up = True
                log.info("kafka_up", idempotent=self._idempotent, spooled=self._spool.pending)
        finally:
            self._connecting = None
            self._wake.set()

    def _new_producer(self) -> AIOKafkaProducer:
        s = self._s
        acks: int | str = "all" if s.acks == "all" else int(s.acks)
        return AIOKafkaProducer(
            bootstrap_servers=list(s.bootstrap_servers),
            client_id=s.client_id,
            acks=acks,
            enable_idempotence=self._idempotent,
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=int(s.linger_ms),
            request_timeout_ms=int(s.request_timeout_s * 1000),
            max_batch_size=_BATCH_BYTES,
        )

    def _lose_producer(self, during: str, exc: BaseException | None) -> None:
        self.producer_errors += 1
        self._m.producer_errors.inc()
        if self._producer is not None:
            # Abandon it: its unacked batches are spooled by the caller and
            # must not go out later from this producer (no duplicates).
            self._discard(self._producer)
            self._producer = None
        if self.kafka_up or (during == "connect" and self._backoff_s == _BACKOFF_MIN_S):
            log.warning("kafka_down", during=during, error=str(exc)[:200] if exc else self._last_error)
        self.kafka_up = False
        self._down = True
        self._retry_at = asyncio.get_running_loop().time() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)

    def _discard(self, producer: AIOKafkaProducer) -> None:
        task = asyncio.create_task(_abandon(producer, self._deadline_s))
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a late ack/failure seen (we already spooled its event)."""
    if not fut.cancelled():
        fut.exception()


async def _abandon(producer: AIOKafkaProducer, timeout_s: float) -> None:
    """Stop a producer without letting it deliver what it still holds.
    aiokafka has no abort(): fail its queued batches, then stop() (which
    cancels its sender and closes the connections)."""
    try:
        producer._message_accumulator.fail_all(KafkaError("abandoned by the event shipper"))
    except Exception:  # private API: if it moved, stop() alone still ends it
        pass
    try:
        async with asyncio.timeout(timeout_s):
            await producer.stop()
    except Exception:
        try:
            await producer.client.close()
        except Exception:
            pass


def config_problems(s: EventsSettings) -> list[str]:
    """"key: problem" lines for what the types cannot say (for settings.validate,
    so a bad [events] section exits 78 at start, not later)."""
    from aiokafka import codec

    problems = []
    available = {"none": True, "gzip": codec.has_gzip(), "snappy": codec.has_snappy(),
                 "lz4": codec.has_lz4(), "zstd": codec.has_zstd()}
    if s.bootstrap_servers and not available[s.compression]:
        problems.append(f"events.compression: {s.compression} needs a library that is not installed")
    if s.high_water > s.queue_size:
        problems.append("events.high_water: must not exceed events.queue_size")
    if s.spool_segment_bytes > s.spool_max_bytes:
        problems.append("events.spool_segment_bytes: must not exceed events.spool_max_bytes")
    for i, server in enumerate(s.bootstrap_servers):
        host, sep, port = server.rpartition(":")
        if not sep or not host or not port.isdigit():
            problems.append(f"events.bootstrap_servers[{i}]: expected host:port, got {server!r}")
    return problems


def make_event_sink(
    settings: EventsSettings, *, instance_id: str | None = None, registry: CollectorRegistry | None = None
) -> EventSink:
    """The configured sink: Kafka when bootstrap_servers is set, else the
    JSON-lines file (so `make run` needs no Kafka)."""
    if settings.bootstrap_servers:
        return EventShipper(settings, instance_id=instance_id, registry=registry)
    from proxy.jsonl_sink import JsonlSink

    return JsonlSink(settings, instance_id=instance_id, registry=registry)
