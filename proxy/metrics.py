"""Prometheus metrics, one registry per server (tests run several in a
process). Exposition over HTTP (proxy/httpd.py) only when `metrics.listen` is set."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from classifier.batch_metrics import CloseReason, FallbackReason, Work
from proxy.transaction import TransactionRecord

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class BatcherPrometheus:
    """classifier.batch_metrics.BatcherMetrics on prometheus_client.

    Called on the event loop only (the batcher's contract), like the rest.
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "triaged_classifier_batch_size", "Requests per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batches = Counter(
            "triaged_classifier_batches", "Model calls by why the batch closed", ["reason"], registry=r
        )
        self.queue_wait_seconds = Histogram(
            "triaged_classifier_queue_wait_seconds", "Submit to batch start", buckets=_FAST_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "triaged_classifier_inference_seconds", "One batch, start to results (inference process round trip)",
            buckets=_FAST_BUCKETS, registry=r,
        )
        self.features_seconds = Histogram(
            "triaged_classifier_features_seconds", "Feature extraction of one batch", buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "triaged_classifier_model_seconds", "One batch's model call", buckets=_FAST_BUCKETS, registry=r
        )
        # CPU vs wall of the same: the gap is waiting for a core (or the GIL).
        self.features_cpu = Counter(
            "triaged_classifier_features_cpu_seconds", "CPU time in feature extraction", registry=r
        )
        self.model_cpu = Counter(
            "triaged_classifier_model_cpu_seconds", "CPU time in model calls", registry=r
        )
        self.depth = Gauge("triaged_classifier_queue_depth", "Requests waiting for a batch", registry=r)
        # The depth is reported at every submit: kept as a plain number and
        # read at scrape time, not a locked gauge update per message.
        self._depth = 0
        self.depth.set_function(lambda: self._depth)
        self.timeouts = Counter("triaged_classifier_timeouts", "Requests past their deadline", registry=r)
        self.overloads = Counter("triaged_classifier_overloads", "Requests refused on a full queue", registry=r)
        self.batch_errors = Counter(
            "triaged_classifier_batch_errors", "Requests in batches that failed", registry=r
        )
        # Degraded verdicts: stamped by the header rules (X-Triage-Model:
        # rules-fallback/1) because the model gave none in time or failed.
        self.fallbacks = Counter(
            "triaged_classifier_fallbacks", "Verdicts from the header-rules fallback, by why",
            ["reason"], registry=r,
        )
        self._batches: dict[str, Any] = {}  # labelled children of `batches`, by reason

    def batch(self, size: int, reason: CloseReason) -> None:
        self.batch_size.observe(size)
        child = self._batches.get(reason)
        if child is None:  # `.labels()` per batch costs more than the rest of this
            child = self._batches[reason] = self.batches.labels(reason)
        child.inc()

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def inference(self, seconds: float, size: int, cpu_seconds: float = 0.0) -> None:
        del size
        del cpu_seconds  # this process only waits for the runner: see model_cpu
        self.inference_seconds.observe(seconds)

    def batch_work(self, features: Work, model: Work) -> None:
        self.features_seconds.observe(features[0])
        self.features_cpu.inc(features[1])
        self.model_seconds.observe(model[0])
        self.model_cpu.inc(model[1])

    def queue_depth(self, depth: int) -> None:
        self._depth = depth

    def timeout(self) -> None:
        self.timeouts.inc()

    def overload(self) -> None:
        self.overloads.inc()

    def error(self, size: int) -> None:
        self.batch_errors.inc(size)

    def fallback(self, reason: FallbackReason) -> None:
        self.fallbacks.labels(reason).inc()


class Metrics:
    """Also a TransactionSink: counts every finished transaction."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.transactions = Counter(
            "triaged_transactions", "Finished mail transactions", ["verdict", "category"], registry=r
        )
        self.transaction_seconds = Histogram(
            "triaged_transaction_seconds", "End of DATA to final reply", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.classifier_seconds = Histogram(
            "triaged_classifier_seconds", "Classification latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.message_bytes = Counter("triaged_message_bytes", "Message bytes relayed", registry=r)
        self.connections = Counter(
            "triaged_connections", "Client connections by outcome", ["result"], registry=r
        )
        self.connections_open = Gauge("triaged_connections_open", "Open client connections", registry=r)
        self.inflight_bytes = Gauge(
            "triaged_inflight_data_bytes", "Message bytes held in memory", registry=r
        )
        self.upstream_errors = Counter(
            "triaged_upstream_errors", "Next-hop failures answered with 4xx", ["kind"], registry=r
        )
        self.upstream_leases_returned = Counter(
            "triaged_upstream_leases_returned",
            "Next-hop connections taken back from idle transactions (replayed later)",
            ["reason"],
            registry=r,
        )
        self.classifier_errors = Counter(
            "triaged_classifier_errors", "Classifier failures and timeouts", registry=r
        )
        self.batcher = BatcherPrometheus(r)
        self.classifier_reloads = Counter(
            "triaged_classifier_reloads", "Model reloads (SIGHUP) by result", ["result"], registry=r
        )
        # Shadow mode: disagreement rate = agreed="no" / all, per head.
        self.shadow_verdicts = Counter(
            "triaged_shadow_verdicts",
            "Messages the shadow model also classified, by head and whether it agreed "
            "with the serving model",
            ["head", "agreed"],
            registry=r,
        )
        # Labelled children used per connection or per message, looked up
        # once: `.labels()` validates and locks on every call (~2 us).
        self.connections_accepted = self.connections.labels("accepted")
        self._transactions: dict[tuple[str, str], Any] = {}
        # [head][agreed] -> child: one message, two increments, no label lookup.
        self._shadow = {
            head: {agreed: self.shadow_verdicts.labels(head, "yes" if agreed else "no")
                   for agreed in (True, False)}
            for head in ("category", "spam")
        }  # fmt: skip

    def record(self, record: TransactionRecord) -> None:
        key = (record.verdict, record.category or "none")
        child = self._transactions.get(key)
        if child is None:
            child = self._transactions[key] = self.transactions.labels(*key)
        child.inc()
        self.transaction_seconds.observe(record.total_latency_ms / 1000.0)
        if record.category is not None:
            self.classifier_seconds.observe(record.classifier_latency_ms / 1000.0)
        self.message_bytes.inc(record.size_bytes)
        if record.shadow is not None:
            self._shadow["category"][record.shadow.same_category].inc()
            self._shadow["spam"][record.shadow.same_spam].inc()
