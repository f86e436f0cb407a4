"""The supervisor's one inference service for all its workers.

With classifier.kind = "onnx", runner "process" or "service" and no
classifier.endpoint, the supervisor starts one InferenceHost
(classifier/serving/) before the workers, on a Unix socket in a private
directory (mode 0700, under $RUNTIME_DIRECTORY when systemd gives one, else
the temp dir), and every worker gets runner = "service" with that endpoint:
features are computed in the workers, the model runs once per batch across
all of them, and the model is loaded once per host rather than once per
worker. SIGHUP reloads the model once, here; the workers only re-read what
the service serves. runner = "thread" or an explicit endpoint (a remote GPU
host) keep the workers' own classifier as configured.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec
import structlog
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from classifier.config import ClassifierSettings
from classifier.serving import service_wire as wire
from classifier.serving.inference_host import InferenceHost
from classifier.types import ClassifierError
from proxy.settings import Settings

log = structlog.get_logger("triaged.supervisor")

PING_TIMEOUT_S = 2.0
STATS_TIMEOUT_S = 5.0
# Classifier keys the service itself was started with (the workers' other
# keys, e.g. timeout_ms or rule_overrides, reload live in the workers). A
# SIGHUP re-reads both model files; pointing the shadow at another file needs
# a restart here (a single process takes it live).
HOST_KEYS = ("kind", "provider", "device_id", "intra_op_num_threads", "runner", "batcher", "service",
             "shadow_model_path")


def wants_host(settings: Settings) -> bool:
    c = settings.classifier
    return c.kind == "onnx" and c.runner != "thread" and not c.endpoint


def for_worker(classifier: ClassifierSettings, endpoint: str) -> ClassifierSettings:
    """A worker's classifier settings when the supervisor runs the service."""
    if classifier.kind != "onnx" or classifier.runner == "thread" or classifier.endpoint:
        return classifier
    return msgspec.structs.replace(classifier, runner="service", endpoint=endpoint)


def host_restart_keys(old: ClassifierSettings, new: ClassifierSettings) -> list[str]:
    return [f"classifier.{k}" for k in HOST_KEYS if getattr(old, k) != getattr(new, k)]


class SharedInference:
    def __init__(self, settings: ClassifierSettings) -> None:
        base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self._dir = Path(tempfile.mkdtemp(prefix="triaged-inference-", dir=base))  # 0700
        self.endpoint = f"unix:{self._dir / 'inference.sock'}"
        self.host = InferenceHost(settings, self.endpoint)
        self._ok_at = 0.0  # monotonic time of the last answered ping
        self.problem: str | None = "inference service not started"

    async def start(self) -> None:
        try:
            await self.host.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._ok_at = time.monotonic()
        self.problem = None

    async def close(self) -> None:
        try:
            await self.host.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def reload(self, path: str) -> bool:
        """SIGHUP: load the model file once in the service; False keeps the old one."""
        try:
            await self.host.reload(path)
        except (ClassifierError, OSError, TimeoutError) as exc:
            log.error("classifier_reload_failed", error=str(exc), where="inference service")
            return False
        return True

    async def check(self) -> None:
        """Ping it (the supervisor's pinger, every second); `problem` for health."""
        try:
            ok = await self.host.ping(PING_TIMEOUT_S)
        except (OSError, TimeoutError, ClassifierError):
            ok = False
        now = time.monotonic()
        if ok:
            self._ok_at = now
            self.problem = None
        else:
            self.problem = f"inference service not answering for {now - self._ok_at:.1f}s"

    async def collector(self) -> Collector | None:
        try:
            async with asyncio.timeout(STATS_TIMEOUT_S):
                stats = await self.host.stats()
        except (OSError, TimeoutError, ClassifierError):
            return None
        return _StatsCollector(stats, self.host.restarts)


class _StatsCollector(Collector):
    def __init__(self, stats: wire.ServiceStats, restarts: int) -> None:
        self._s = stats
        self._restarts = restarts

    def collect(self) -> Iterable[Metric]:
        s = self._s
        out = []

        def counter(name: str, doc: str, value: float, **labels: str) -> None:
            m = Metric(name, doc, "counter")
            m.add_sample(f"{name}_total", labels, value)
            out.append(m)

        counter("triaged_inference_batches", "Model calls of the shared inference service", s.batches)
        counter("triaged_inference_requests", "Messages the shared inference service ran", s.requests)
        counter("triaged_inference_multi_client_batches",
                "Batches holding messages from more than one worker connection", s.multi_client_batches)
        counter("triaged_inference_overloaded", "Requests refused on a full service queue", s.overloaded)
        counter("triaged_inference_deadline", "Requests past their deadline in the service", s.deadline)
        counter("triaged_inference_errors", "Messages the model failed on", s.errors)
        counter("triaged_inference_reloads", "Model reloads in the service", s.reloads)
        counter("triaged_inference_failed_reloads", "Model reloads that failed (old model kept)",
                s.failed_reloads)
        counter("triaged_inference_restarts", "Inference service processes restarted", self._restarts)
        sizes = Metric("triaged_inference_batches_by_size", "Batches of the service by size", "counter")
        for size, count in sorted(s.batch_sizes.items()):
            sizes.add_sample("triaged_inference_batches_by_size_total", {"size": str(size)}, count)
        out.append(sizes)
        conns = Metric("triaged_inference_connections", "Worker connections open to the service", "gauge")
        conns.add_sample("triaged_inference_connections", {}, s.connections)
        out.append(conns)
        model = Metric("triaged_inference_model", "The model the service serves", "gauge")
        model.add_sample("triaged_inference_model", {"model": s.name_version, "provider": s.provider}, 1)
        out.append(model)
        return out
