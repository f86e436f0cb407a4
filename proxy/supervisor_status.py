"""What the supervisor's metrics listener answers: /metrics, /healthz, /readyz.

The listener is the single-process one (proxy/httpd.py StatusServer, in
threads of its own) with the supervisor's providers:

- /metrics asks every live worker for its registry over the control channel
  (on the supervisor's loop) and merges them, each sample labelled
  `worker="K"`, plus the supervisor's own gauges (workers alive, restarts).
- /healthz (alive): every live worker answers its ping and says its loop is
  responsive, and at least one lives. A slot whose worker is being replaced
  is the supervisor at work, not a fault; a worker that stays silent is
  killed and replaced (server.worker_hang_timeout_s).
- /readyz (ready): at least one worker lives and every live one is ready by
  its own health snapshot (proxy/health.py: model loaded, inference
  answering, next hop reachable, not draining). One unready worker makes the
  host unready: a balancer then sends its share elsewhere rather than to a
  worker that would tempfail it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy import control
from proxy.health import HealthSnapshot, watchdog_healthy
from proxy.httpd import MetricsProvider

if TYPE_CHECKING:
    from proxy.supervisor import Supervisor, WorkerSlot

SCRAPE_TIMEOUT_S = 5.0


def worker_snapshot(slot: WorkerSlot, now: float) -> HealthSnapshot | None:
    """The worker's last reported snapshot, judged stale when its pongs stopped."""
    if not slot.health:
        return None
    try:
        snap = msgspec.convert(slot.health, HealthSnapshot)
    except msgspec.ValidationError:
        return None
    if not slot.responsive(now):
        return msgspec.structs.replace(
            snap, alive=False, ready=False, classifier_ok=False,
            reasons=[f"no answer for {now - slot.last_pong:.1f}s", *snap.reasons],
        )
    return snap


def combined(sup: Supervisor) -> HealthSnapshot:
    """One snapshot for the host, the workers' problems in `reasons`."""
    now = time.monotonic()
    live = [s for s in sup.slots if s.live]
    reasons: list[str] = []
    alive = ready = classifier_ok = upstream_ok = bool(live)
    if not live:
        reasons.append("no worker listening")
    if sup.stopping:
        ready = False
        reasons.append("draining")
    models: list[str] = []
    lag = 0.0
    for slot in live:
        snap = worker_snapshot(slot, now)
        if snap is None:  # listening, no health answer yet
            if not slot.responsive(now):
                alive = ready = classifier_ok = False
                reasons.append(f"worker {slot.slot}: no answer")
            continue
        alive &= snap.alive
        ready &= snap.ready
        classifier_ok &= watchdog_healthy(snap)
        upstream_ok &= snap.upstream_ok
        lag = max(lag, snap.loop_lag_s)
        reasons += [f"worker {slot.slot}: {r}" for r in snap.reasons]
        if snap.model and snap.model not in models:
            models.append(snap.model)
    host_problem = sup.inference_problem()
    if host_problem:
        classifier_ok = ready = False
        reasons.append(host_problem)
    return HealthSnapshot(
        alive=alive,
        ready=ready and alive,
        reasons=reasons,
        loop_lag_s=lag,
        heartbeat_age_s=0.0,
        model=", ".join(models) or None,
        classifier_ok=classifier_ok,
        upstream_ok=upstream_ok,
        draining=sup.stopping,
        pid=os.getpid(),
    )


def metrics_provider(sup: Supervisor, loop: asyncio.AbstractEventLoop) -> MetricsProvider:
    """For StatusServer (called in its thread): the merged exposition, gathered on `loop`."""

    def provide(accept: str) -> tuple[bytes, str]:
        future = asyncio.run_coroutine_threadsafe(merged_registry(sup), loop)
        registry = future.result(SCRAPE_TIMEOUT_S + 5)
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    return provide


async def merged_registry(sup: Supervisor) -> CollectorRegistry:
    async def scrape(slot: WorkerSlot) -> tuple[int, list[control.Family]]:
        try:
            reply = await slot.ask(control.MetricsRequest, SCRAPE_TIMEOUT_S)
        except (TimeoutError, control.ChannelClosed):
            return slot.slot, []
        assert isinstance(reply, control.MetricsReply)
        return slot.slot, reply.families

    results = await asyncio.gather(*(scrape(s) for s in sup.slots if s.live))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(results))
    registry.register(_SupervisorCollector(sup))
    for extra in await sup.extra_collectors():
        registry.register(extra)
    return registry


class _Merged(Collector):
    """Every worker's families as one family per name, samples labelled worker="K"."""

    def __init__(self, per_worker: list[tuple[int, list[control.Family]]]) -> None:
        self._per_worker = per_worker

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for slot, families in self._per_worker:
            for fam in families:
                metric = merged.get(fam.name)
                if metric is None:
                    metric = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    metric.add_sample(s.name, {**s.labels, "worker": str(slot)}, s.value)
        return list(merged.values())


class _SupervisorCollector(Collector):
    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup

    def collect(self) -> Iterable[Metric]:
        alive = Metric("triaged_workers_alive", "Worker processes listening", "gauge")
        alive.add_sample("triaged_workers_alive", {}, float(sum(s.live for s in self._sup.slots)))
        restarts = Metric("triaged_worker_restarts", "Workers replaced after they exited or hung", "counter")
        restarts.add_sample("triaged_worker_restarts_total", {}, float(self._sup.restarts))
        return [alive, restarts]
