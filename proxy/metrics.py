"""Prometheus metrics, one registry per server (tests run several in a
process). Exposition over HTTP only when `metrics.listen` is set."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from proxy.transaction import TransactionRecord

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.classifier_errors = Counter(
            "triaged_classifier_errors", "Classifier failures and timeouts", registry=r
        )
        self._server: Any = None

    def record(self, record: TransactionRecord) -> None:
        self.transactions.labels(record.verdict, record.category or "none").inc()
        self.transaction_seconds.observe(record.total_latency_ms / 1000.0)
        if record.category is not None:
            self.classifier_seconds.observe(record.classifier_latency_ms / 1000.0)
        self.message_bytes.inc(record.size_bytes)

    def serve(self, host: str, port: int) -> int:
        """Start the exposition endpoint in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
