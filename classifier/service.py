"""The ONNX classifier service: what the proxy calls.

    service = OnnxClassifierService(settings.classifier, metrics=...)
    await service.start()            # starts the runner, loads the model
    verdict = await service.classify(raw)
    await service.reload()           # hot swap (SIGHUP)
    await service.ping()             # readiness/watchdog: True while the model side answers
    await service.close()            # drains the queue, stops the runner

classify() queues a view of the message's first `prefix_bytes` (what the
model reads at all: classifier.inference.prefix_bytes_of), never a copy of
the whole message; the batcher hands each batch to a runner, which
featurizes it, calls the model once and applies the header-rule overrides
(classifier/inference.py):

- "process" (the default): an inference process per model
  (classifier/process_runner.py). Features are Python and hold a GIL; there
  they hold their own, so the SMTP loop and the model never wait for each
  other. Its batches are collected and awaited on the event loop
  (classifier/loop_batcher.py): no thread in this process waits on it.
- "thread": the batcher's worker thread (classifier/batcher.py) runs the
  same code in this process.
- "service": features here (on the loop, by the loop batcher), the model in
  a shared inference service at `endpoint` that batches across every worker
  of a host (or several hosts) (classifier/serving/). reload() then does not load a model: the service's
  owner reloads it once for all its clients (InferenceHost.reload, or SIGHUP
  to `triaged inference`); a worker's reload() only re-reads what the service
  serves now (model name, feature spec), which the service also pushes to
  every connection after a swap. An unreachable service is a ClassifierError
  for the messages in flight (the header rules' verdict below) and the
  runner reconnects with backoff.

The deadline (`timeout_ms`) has one owner, the batcher: it counts every
miss (metrics.timeout). A message the model gives no verdict for, because its
deadline passed or its batch or the inference process failed, gets the
header-rules verdict instead (classifier/rules.py), stamped with the model
name FALLBACK_MODEL and counted (metrics.fallback); the log says when the
service starts and stops degrading, not per message. Only a full queue
(Overloaded, answered at once) and a closed service raise.

Each request carries the runner it was submitted to, and the worker groups a
batch by runner: a batch never mixes models, a request is never answered by a
model that is still loading, and nothing is lost across a hot swap. A
replaced runner is stopped once its last request is answered.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from classifier import rules
from classifier import worker_wire as wire
from classifier.batch_metrics import BatcherMetrics, FallbackReason, NullMetrics
from classifier.batcher import Batcher, BatcherClosed
from classifier.config import ClassifierSettings
from classifier.inference import (
    DEFAULT_LOADER,
    BatchModel,
    BatchTiming,
    ModelLoader,
    classify_batch,
    labels_of,
    load_and_warm,
    prefix_bytes_of,
    resolve_loader,
)
from classifier.loop_batcher import LoopBatcher
from classifier.process_runner import ProcessModel
from classifier.providers import ProviderChoice, log_choice
from classifier.serving.remote_runner import RemoteRunner
from classifier.types import Classification, ClassifierError, DeadlineExceeded, Overloaded

log = structlog.get_logger("triaged.classifier")

# The GIL switch interval the service sets at start (CPython's default is
# 5 ms). The batcher's worker needs the GIL back each time it wakes to collect
# a batch or its runner returns, while the loop thread is running Python
# (SMTP). A thread waiting for the GIL gets it only after the holder has run a
# whole switch interval, so at 5 ms every batch paid up to a few of those in
# queue wait. Process-wide, so it is set only where it was measured to help:
# bench/results/batching_cpu_thread_features_on_loop.md.
SWITCH_INTERVAL_S = 0.0005

# A batch the inference process has not answered in this many request
# timeouts (and at least HANG_MIN_S) is hung: the process is killed, and a
# fresh one serves the next batch. Its callers left long before.
HANG_TIMEOUTS = 4
HANG_MIN_S = 10.0

# X-Triage-Model of a verdict the header rules gave because the model could
# not: "name/version" like every model name, and not "rules/1", so a reader
# can tell a degraded verdict from a site that runs the rules on purpose.
FALLBACK_MODEL = "rules-fallback/1"
# The rules read the header block only; they get at most this much of a
# message (features read no header past 64 KiB either: header_max_bytes).
FALLBACK_HEAD_BYTES = 1 << 16
# "Recovered" is logged at the first model verdict after this long without a
# fallback, so a model that misses some deadlines logs a pair of lines per
# quiet period, not one per message.
RECOVERED_AFTER_S = 1.0


class Runner(Protocol):
    """Runs whole batches for one loaded model (from the batcher's worker
    thread). ProcessModel and RemoteRunner have the same shape with
    `classify_batch` and `close` awaited on the loop (LoopRunner)."""

    @property
    def name_version(self) -> str: ...

    @property
    def choice(self) -> ProviderChoice: ...

    @property
    def prefix_bytes(self) -> int | None:
        """Bytes of a message the model reads (None: all); the rest is never sent."""

    def classify_batch(
        self, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]: ...

    def close(self) -> None: ...


# What a loaded model is run by: a blocking Runner in the batcher's thread,
# or one awaited on the loop (the inference process, the inference service).
LoopRunner = ProcessModel | RemoteRunner
AnyRunner = Runner | LoopRunner


class ThreadRunner:
    """A model loaded in this process, run by the batcher's worker thread."""

    def __init__(
        self,
        model: BatchModel,
        choice: ProviderChoice,
        *,
        overrides: bool,
        trusted_authserv_ids: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.choice = choice
        self.name_version = model.name_version
        self.prefix_bytes = prefix_bytes_of(model)
        self._overrides = overrides
        self._labels = labels_of(model)
        self._trusted = frozenset(a.lower() for a in trusted_authserv_ids)

    def classify_batch(
        self, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]:
        return classify_batch(
            self.model, raws, overrides=self._overrides, labels=self._labels, trusted=self._trusted
        )

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _Current:
    runner: AnyRunner
    pending: int = 0  # classify() calls submitted to it and not yet answered
    retired: bool = False  # replaced by a reload: stop it when pending is 0


@dataclass(slots=True)
class _Item:
    target: _Current
    raw: bytes | memoryview  # the prefix the model reads, a view: no copy


def _prefix(raw: bytes, limit: int | None) -> bytes | memoryview:
    """The first `limit` bytes of `raw` as a view (slicing bytes would copy)."""
    if limit is None or len(raw) <= limit:
        return raw
    return memoryview(raw)[:limit]


class OnnxClassifierService:
    def __init__(
        self,
        settings: ClassifierSettings,
        *,
        metrics: BatcherMetrics | None = None,
        loader: ModelLoader | str | None = None,
    ) -> None:
        """`loader` loads a model file: a function (thread runner only) or a
        "module:function" name, which the inference process imports."""
        self._settings = settings
        self._metrics: BatcherMetrics = metrics if metrics is not None else NullMetrics()
        if settings.runner == "process" and loader is not None and not isinstance(loader, str):
            raise ValueError('runner = "process" takes the loader as "module:function"')
        self._loader: ModelLoader | str = loader if loader is not None else DEFAULT_LOADER
        self._path = settings.model_path
        self._current: _Current | None = None
        self._batcher: Batcher[_Item, Classification] | LoopBatcher[_Item, Classification] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()  # runners being stopped
        # Fallback state, for one log line per change (see _fallback).
        self._degraded_since: float | None = None  # monotonic; None: the model answers
        self._last_fallback = 0.0
        self._fallbacks = 0  # in the current degraded spell

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._batcher is not None:
            return
        s = self._settings
        self._loop = asyncio.get_running_loop()
        runner = await self._open(self._path)
        self._current = _Current(runner)
        if s.runner in ("process", "service"):
            self._batcher = LoopBatcher(
                self._run_batch_on_loop, s.batcher, timeout_ms=s.timeout_ms,
                metrics=self._metrics,
            )
        else:
            self._batcher = Batcher(
                self._run_batch, s.batcher, timeout_ms=s.timeout_ms, metrics=self._metrics
            )
            if SWITCH_INTERVAL_S and sys.getswitchinterval() > SWITCH_INTERVAL_S:
                sys.setswitchinterval(SWITCH_INTERVAL_S)
        await self._batcher.start()
        log_choice(runner.choice, runner.name_version)
        pid = getattr(runner, "pid", None)
        log.info("classifier.runner", runner=s.runner, pid=pid)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close(drain=True)
        current = self._current  # kept: model_name still says what ran
        if current is not None and not current.retired:
            current.retired = True
            self._stop(current.runner)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    async def classify(self, raw: bytes) -> Classification:
        """The model's verdict, or the header rules' when the model gives none
        in time. Raises Overloaded (full queue) and BatcherClosed only."""
        batcher, current = self._batcher, self._current
        if batcher is None or current is None:
            raise BatcherClosed("classifier is not running")
        current.pending += 1
        try:
            verdict = await batcher.submit(_Item(current, _prefix(raw, current.runner.prefix_bytes)))
        except (Overloaded, BatcherClosed):
            raise
        except ClassifierError as exc:  # DeadlineExceeded included: the batcher counted it
            return self._fallback(raw, exc)
        finally:
            current.pending -= 1
            if current.retired and current.pending == 0:
                self._stop(current.runner)
        if self._degraded_since is not None:
            self._maybe_recovered()
        return verdict

    async def reload(self, path: str | None = None) -> str:
        """Load `path` (default: the current model file) and swap it in.

        The old model keeps answering while the new one loads (in a new
        inference process, or a thread); on failure the old model stays and
        the error is raised. With runner = "service" the model lives in the
        shared service and is reloaded there, once, by its owner: this only
        asks the service what it serves now (`path` is not used).
        """
        if self._batcher is None:
            raise BatcherClosed("classifier is not running")
        if self._settings.runner == "service":
            return await self._refresh_remote(path)
        async with self._reload_lock:
            target = path if path is not None else self._path
            new = _Current(await self._open(target))
            old, self._current, self._path = self._current, new, target
            # Requests submitted from now on go to the new runner; queued ones
            # finish on the old, which stops after its last answer.
            if old is not None:
                old.retired = True
                if old.pending == 0:
                    self._stop(old.runner)
            log.info("classifier.reloaded", model=new.runner.name_version,
                     pid=getattr(new.runner, "pid", None))
            return new.runner.name_version

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when a verdict could come from the model now: the batcher's
        worker answers between batches and, per runner, the inference process
        is up or the inference service answers. For readiness and watchdogs;
        never raises."""
        batcher, current = self._batcher, self._current
        if batcher is None or current is None or not batcher.running:
            return False
        runner = current.runner
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(runner, RemoteRunner):
                    from classifier.serving import control

                    return await control.ping(runner.endpoint, timeout_s) is not None
                await batcher.run_in_worker(lambda: None)
        except (TimeoutError, ClassifierError):
            return False
        alive = getattr(runner, "alive", None)
        return bool(alive()) if callable(alive) else True

    # -- introspection -----------------------------------------------------

    @property
    def model_name(self) -> str | None:
        """"name/version" of the model answering; None before start, and with
        runner = "service" until the service has been reached once."""
        return (self._current.runner.name_version or None) if self._current is not None else None

    @property
    def provider(self) -> str | None:
        return self._current.runner.choice.kind if self._current is not None else None

    @property
    def runner(self) -> AnyRunner | None:
        return self._current.runner if self._current is not None else None

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher is not None else 0

    @property
    def degraded(self) -> bool:
        """True from a fallback verdict until the model answers again."""
        return self._degraded_since is not None

    # -- internals ---------------------------------------------------------

    def _fallback(self, raw: bytes, exc: ClassifierError) -> Classification:
        reason: FallbackReason = "timeout" if isinstance(exc, DeadlineExceeded) else "error"
        self._metrics.fallback(reason)
        now = time.monotonic()
        self._last_fallback = now
        self._fallbacks += 1
        if self._degraded_since is None:
            self._degraded_since = now
            log.warning("classifier.degraded", reason=reason, error=str(exc),
                        fallback=FALLBACK_MODEL)
        # Slicing copies at most FALLBACK_HEAD_BYTES; the rules search bytes.
        category, score = rules.classify_headers(rules.header_fields(raw[:FALLBACK_HEAD_BYTES]))
        return Classification(category=category, score=score, model=FALLBACK_MODEL)

    def _maybe_recovered(self) -> None:
        assert self._degraded_since is not None
        now = time.monotonic()
        if now - self._last_fallback < RECOVERED_AFTER_S:
            return
        log.info("classifier.recovered", degraded_s=round(now - self._degraded_since, 3),
                 fallbacks=self._fallbacks, model=self.model_name)
        self._degraded_since = None
        self._fallbacks = 0


    async def _refresh_remote(self, path: str | None) -> str:
        assert self._batcher is not None and self._current is not None
        runner = self._current.runner
        assert isinstance(runner, RemoteRunner)
        if path is not None and path != self._path:
            log.warning("classifier.reload_path_ignored", path=path,
                        reason="runner = service: the service's owner reloads its model")
        # The runner's lock puts it between batches on the connection.
        name = await runner.refresh()
        log.info("classifier.reloaded", model=name, runner="service",
                 endpoint=self._settings.endpoint)
        return name

    async def _open(self, path: str) -> AnyRunner:
        s = self._settings
        loader = self._loader
        if s.runner == "service":
            return await RemoteRunner.open(s)
        if s.runner == "process":
            assert isinstance(loader, str)
            hang_s = max(HANG_MIN_S, HANG_TIMEOUTS * s.timeout_ms / 1000.0)
            start = wire.Start(path, loader, s.provider, s.device_id, s.intra_op_num_threads,
                               s.rule_overrides, s.trusted_authserv_ids, s.shadow_model_path)
            return await asyncio.to_thread(ProcessModel.spawn, start, hang_timeout_s=hang_s)
        fn: ModelLoader = resolve_loader(loader) if isinstance(loader, str) else loader

        def load() -> ThreadRunner:
            model, choice = load_and_warm(path, s.provider, s.device_id,
                                          s.intra_op_num_threads, fn, s.shadow_model_path)
            return ThreadRunner(model, choice, overrides=s.rule_overrides,
                                trusted_authserv_ids=s.trusted_authserv_ids)

        # A thread of its own, not the inference worker: batches go on with
        # the old model meanwhile.
        return await asyncio.to_thread(load)

    def _stop(self, runner: AnyRunner) -> None:
        """Stop a runner off the loop (it waits for a running batch to end)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            runner.close() if isinstance(runner, LoopRunner) else asyncio.to_thread(runner.close)
        )
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _run_batch(self, items: list[_Item]) -> list[Classification | Exception]:
        # Runs in the worker thread. One group, except across a hot swap.
        results: list[Classification | Exception | None] = [None] * len(items)
        for runner, indexes in _group_by_runner(items).values():
            assert not isinstance(runner, LoopRunner)  # the thread runner only
            verdicts, timing = runner.classify_batch([items[i].raw for i in indexes])
            _check_count(verdicts, indexes)
            for i, verdict in zip(indexes, verdicts, strict=True):
                results[i] = verdict
            self._post_timing(timing)
        return [r if r is not None else ClassifierError("no result") for r in results]

    async def _run_batch_on_loop(self, items: list[_Item]) -> list[Classification | Exception]:
        # The LoopBatcher's batch: one group, except across a hot swap.
        results: list[Classification | Exception | None] = [None] * len(items)
        for runner, indexes in _group_by_runner(items).values():
            assert isinstance(runner, LoopRunner)  # the LoopBatcher's runners
            verdicts, timing = await runner.classify_batch([items[i].raw for i in indexes])
            _check_count(verdicts, indexes)
            for i, verdict in zip(indexes, verdicts, strict=True):
                results[i] = verdict
            self._metrics_timing(timing)
        return [r if r is not None else ClassifierError("no result") for r in results]

    def _metrics_timing(self, timing: BatchTiming) -> None:
        # Metrics hooks run on the loop (their contract).
        self._metrics.batch_work((timing.features_s, timing.features_cpu_s),
                                 (timing.model_s, timing.model_cpu_s))

    def _post_timing(self, timing: BatchTiming) -> None:
        # From the thread batcher's worker: handed to the loop.
        if self._loop is None or isinstance(self._metrics, NullMetrics):
            return
        try:
            self._loop.call_soon_threadsafe(self._metrics_timing, timing)
        except RuntimeError:  # loop closed
            pass


def _group_by_runner(items: Sequence[_Item]) -> dict[int, tuple[AnyRunner, list[int]]]:
    """Indexes of a batch's items by the runner each was submitted to (a
    batch never mixes models)."""
    groups: dict[int, tuple[AnyRunner, list[int]]] = {}
    for i, item in enumerate(items):
        groups.setdefault(id(item.target), (item.target.runner, []))[1].append(i)
    return groups


def _check_count(verdicts: Sequence[object], inputs: Sequence[object]) -> None:
    if len(verdicts) != len(inputs):
        raise ClassifierError(f"runner returned {len(verdicts)} results for {len(inputs)} inputs")


__all__ = ["FALLBACK_MODEL", "ModelLoader", "OnnxClassifierService", "Runner", "ThreadRunner"]
