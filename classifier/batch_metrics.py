"""Metrics hooks of the micro-batcher.

The classifier stays free of prometheus: the batcher reports to this small
protocol, and the proxy adapts it to prometheus_client (or anything else).
`BatchStats` is an in-memory implementation for tests, benchmarks and
`triaged classify`-style tools; it keeps bounded samples, so it is also safe
to leave attached in a long-running process.

All hooks are called on the event loop thread, never from the inference
thread, so implementations need no locking.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Why a batch was closed: it reached max_batch_size ("full"), its first request
# waited max_wait_ms ("timeout"), or no more requests were arriving while the
# worker was idle ("idle": the lone-request fast path), or the batcher is
# draining on close ("drain").
CloseReason = Literal["full", "timeout", "idle", "drain"]

# Why a message got the header-rules fallback verdict (BatcherMetrics.fallback).
FallbackReason = Literal["timeout", "error"]

# (wall seconds, CPU seconds) of one piece of work.
Work = tuple[float, float]


class BatcherMetrics(Protocol):
    def batch(self, size: int, reason: CloseReason) -> None:
        """A batch of `size` live requests was handed to the worker."""

    def queue_wait(self, seconds: float) -> None:
        """One request waited this long between submit and its batch starting
        (perf_counter, read by the worker thread as it starts the batch)."""

    def inference(self, seconds: float, size: int, cpu_seconds: float = 0.0) -> None:
        """One batch took this long from start to results (with the inference
        process or service: the round trip), of which cpu_seconds on the
        thread batcher's own CPU clock (0 from the loop batcher, whose
        batches run elsewhere)."""

    def batch_work(self, features: Work, model: Work) -> None:
        """Inside one batch, where the runner ran it: feature extraction and
        the model call, each as (wall seconds, CPU seconds of that thread)."""

    def queue_depth(self, depth: int) -> None:
        """Requests waiting after a submit or a batch was taken."""

    def timeout(self) -> None:
        """A request's deadline passed (before or while it ran)."""

    def overload(self) -> None:
        """A submit found the queue full and was refused at once."""

    def error(self, size: int) -> None:
        """A batch of `size` requests failed (exception or output mismatch)."""

    def fallback(self, reason: FallbackReason) -> None:
        """One message got the header-rules verdict because the model gave
        none: its deadline passed ("timeout") or its batch or the inference
        process failed ("error")."""


class NullMetrics:
    """Hooks that do nothing: the default."""

    def batch(self, size: int, reason: CloseReason) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def inference(self, seconds: float, size: int, cpu_seconds: float = 0.0) -> None:
        pass

    def batch_work(self, features: Work, model: Work) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def timeout(self) -> None:
        pass

    def overload(self) -> None:
        pass

    def error(self, size: int) -> None:
        pass

    def fallback(self, reason: FallbackReason) -> None:
        pass


def _samples() -> deque[float]:
    return deque(maxlen=100_000)


@dataclass
class BatchStats:
    """In-memory metrics with bounded samples (the last 100,000 of each)."""

    batch_sizes: deque[float] = field(default_factory=_samples)
    close_reasons: Counter[str] = field(default_factory=Counter)
    queue_waits_s: deque[float] = field(default_factory=_samples)
    inference_s: deque[float] = field(default_factory=_samples)
    inference_total_s: float = 0.0  # all batches, as the worker thread saw them
    # Inside the runner (the inference process, or the worker thread), per batch.
    features_s: deque[float] = field(default_factory=_samples)
    model_s: deque[float] = field(default_factory=_samples)
    features_total_s: float = 0.0
    model_total_s: float = 0.0
    # CPU time of the same (thread CPU clock): immune to other load on the
    # machine and to waits for the GIL, unlike the wall times above.
    inference_cpu_s: float = 0.0
    features_cpu_s: float = 0.0
    model_cpu_s: float = 0.0
    max_queue_depth: int = 0
    timeouts: int = 0
    overloads: int = 0
    errors: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)  # by FallbackReason
    items: int = 0  # requests handed to the worker, all batches

    def batch(self, size: int, reason: CloseReason) -> None:
        self.batch_sizes.append(size)
        self.close_reasons[reason] += 1
        self.items += size

    def queue_wait(self, seconds: float) -> None:
        self.queue_waits_s.append(seconds)

    def inference(self, seconds: float, size: int, cpu_seconds: float = 0.0) -> None:
        del size
        self.inference_s.append(seconds)
        self.inference_total_s += seconds
        self.inference_cpu_s += cpu_seconds

    def batch_work(self, features: Work, model: Work) -> None:
        self.features_s.append(features[0])
        self.features_total_s += features[0]
        self.features_cpu_s += features[1]
        self.model_s.append(model[0])
        self.model_total_s += model[0]
        self.model_cpu_s += model[1]

    def queue_depth(self, depth: int) -> None:
        self.max_queue_depth = max(self.max_queue_depth, depth)

    def timeout(self) -> None:
        self.timeouts += 1

    def overload(self) -> None:
        self.overloads += 1

    def error(self, size: int) -> None:
        del size
        self.errors += 1

    def fallback(self, reason: FallbackReason) -> None:
        self.fallbacks[reason] += 1

    @property
    def batches(self) -> int:
        return sum(self.close_reasons.values())

    @property
    def mean_batch_size(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else 0.0

    def reset(self) -> None:
        """Forget everything (a benchmark's warm-up)."""
        self.__init__()  # type: ignore[misc]


def percentile(samples: list[float] | deque[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100; 0.0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
