"""The ONNX classifier service: what the proxy calls.

    service = OnnxClassifierService(settings.classifier, metrics=...)
    await service.start()            # provider probe + model load, off the loop
    verdict = await service.classify(raw)
    await service.reload()           # hot swap (SIGHUP), off the loop
    await service.close()            # drains the queue

Features are extracted on the event loop as each message arrives, and only
the model call is batched into the worker thread. Both are CPU work; the
split is about the GIL: onnxruntime releases it during session.run, while
feature extraction is Python and holds it. Extracting in the worker made that
thread and the SMTP loop fight over the GIL (in-server throughput per busy
second fell to 46% of offline, bench/results/batching_cpu.md); on the loop it
runs between socket events and the worker never blocks the loop. Messages
over LOOP_FEATURES_MAX_BYTES are still featurized in the worker, so one huge
message cannot stall every connection.

Each request carries the model that featurized it (a hot swap may change the
feature parameters), and the worker runs each model's requests with that
model: a batch never mixes models, a request is never answered by a model
that is still loading, and nothing is lost across a swap.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt
import structlog

from classifier.batch_metrics import BatcherMetrics, NullMetrics
from classifier.batcher import Batcher, BatcherClosed
from classifier.config import ClassifierSettings
from classifier.overrides import apply_override, sure_category
from classifier.providers import ProviderChoice, ProviderError, choose_providers, log_choice
from classifier.types import Classification, ClassifierError

log = structlog.get_logger("triaged.classifier")

# Warms a fresh session (first-run allocations) before it takes real traffic.
_WARMUP = b"From: warm@up.invalid\r\nSubject: warm-up\r\n\r\nwarm-up\r\n"

# Larger messages are featurized in the worker thread instead of on the loop:
# parsing one takes milliseconds that every other connection would wait out.
LOOP_FEATURES_MAX_BYTES = 256 * 1024

# The GIL switch interval the service sets at start (CPython's default is
# 5 ms). The batcher's worker needs the GIL back each time session.run returns
# and each time it wakes to collect a batch, while the loop thread is running
# Python (SMTP, features). A thread waiting for the GIL gets it only after the
# holder has run a whole switch interval, so at 5 ms every batch paid up to a
# few of those in queue wait. Process-wide, so it is set only where it was
# measured to help: bench/results/batching_cpu.md.
SWITCH_INTERVAL_S = 0.0005


class ServiceModel(Protocol):
    """The part of classifier.model.LoadedModel the service uses."""

    @property
    def name_version(self) -> str: ...

    def featurize(self, raw: bytes) -> npt.NDArray[Any]: ...

    def predict(self, batch: Sequence[npt.NDArray[Any]]) -> list[Classification]: ...


# (path, providers, intra_op_num_threads) -> a loaded, ready model. Runs in a
# thread; raises on a bad file.
ModelLoader = Callable[[str, ProviderChoice, int], ServiceModel]


def load_onnx_model(path: str, choice: ProviderChoice, threads: int) -> ServiceModel:
    """The default loader: classifier.model.load_model on the chosen providers."""
    # Imported late so the batcher and its tests do not depend on the model code.
    model_mod = importlib.import_module("classifier.model")
    loaded: ServiceModel = model_mod.load_model(
        path, providers=choice.providers, intra_op_num_threads=threads
    )
    session = getattr(loaded, "session", None)
    if choice.kind == "cuda" and session is not None:
        used = session.get_providers()
        if not used or used[0] != "CUDAExecutionProvider":
            raise ProviderError(f"model session fell back to {used}")
    return loaded


def _labels_of(model: ServiceModel) -> frozenset[str] | None:
    labels = getattr(getattr(model, "manifest", None), "labels", None)
    return frozenset(labels) if isinstance(labels, list | tuple) else None


@dataclass(frozen=True, slots=True)
class _Current:
    model: ServiceModel
    labels: frozenset[str] | None  # the category head's classes, for overrides


@dataclass(slots=True)
class _Item:
    """One request in a batch: features made on the loop, or the raw message."""

    model: ServiceModel
    features: npt.NDArray[Any] | None
    raw: bytes | None


class OnnxClassifierService:
    def __init__(
        self,
        settings: ClassifierSettings,
        *,
        metrics: BatcherMetrics | None = None,
        loader: ModelLoader | None = None,
    ) -> None:
        self._settings = settings
        self._metrics: BatcherMetrics = metrics if metrics is not None else NullMetrics()
        self._overrides = settings.rule_overrides
        self._loader: ModelLoader = loader if loader is not None else load_onnx_model
        self._path = settings.model_path
        self._current: _Current | None = None
        self._choice: ProviderChoice | None = None
        self._batcher: Batcher[_Item, Classification] | None = None
        self._reload_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._batcher is not None:
            return
        s = self._settings
        self._choice = await asyncio.to_thread(choose_providers, s.provider, s.device_id)
        model = await self._load(self._path)
        self._current = _Current(model, _labels_of(model))
        self._batcher = Batcher(
            self._run_batch, s.batcher, timeout_ms=s.timeout_ms, metrics=self._metrics
        )
        if SWITCH_INTERVAL_S and sys.getswitchinterval() > SWITCH_INTERVAL_S:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        await self._batcher.start()
        log_choice(self._choice, model.name_version)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close(drain=True)

    async def classify(self, raw: bytes) -> Classification:
        batcher, current = self._batcher, self._current
        if batcher is None or current is None:
            raise BatcherClosed("classifier is not running")
        batcher.check_room()  # a full queue answers before any work is spent
        model = current.model
        if len(raw) > LOOP_FEATURES_MAX_BYTES:
            item = _Item(model, None, raw)
        else:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                features = model.featurize(raw)
            except Exception as exc:  # the extractor should never raise; if it does, alone
                raise ClassifierError(f"features failed: {type(exc).__name__}") from None
            self._metrics.features(time.perf_counter() - t0, time.thread_time() - c0)
            item = _Item(model, features, None)
        result = await batcher.submit(item)
        if self._overrides:
            result = apply_override(result, sure_category(raw), current.labels)
        return result

    async def reload(self, path: str | None = None) -> str:
        """Load `path` (default: the current model file) and swap it in.

        The old model keeps answering while the new one loads in a thread;
        on failure the old model stays and the error is raised.
        """
        async with self._reload_lock:
            target = path if path is not None else self._path
            new = await self._load(target)
            # Plain assignment on the loop thread: requests featurized from
            # now on carry the new model; queued ones finish on the old.
            self._current, self._path = _Current(new, _labels_of(new)), target
            log.info("classifier.reloaded", model=new.name_version)
            return new.name_version

    # -- introspection -----------------------------------------------------

    @property
    def model_name(self) -> str | None:
        return self._current.model.name_version if self._current is not None else None

    @property
    def provider(self) -> str | None:
        return self._choice.kind if self._choice is not None else None

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher is not None else 0

    # -- internals ---------------------------------------------------------

    async def _load(self, path: str) -> ServiceModel:
        try:
            return await self._load_on(path)
        except ProviderError as exc:
            if self._settings.provider != "auto":
                raise
            # "auto": the probe passed but this model's session did not come
            # up on CUDA (an op without a CUDA kernel, out of memory): use CPU.
            log.warning("classifier.cuda_fallback", reason=str(exc))
            self._choice = choose_providers("cpu")
            return await self._load_on(path)

    async def _load_on(self, path: str) -> ServiceModel:
        if self._choice is None:
            raise BatcherClosed("classifier is not running")
        choice, threads = self._choice, self._settings.intra_op_num_threads

        def load_and_warm() -> ServiceModel:
            model = self._loader(path, choice, threads)
            model.predict([model.featurize(_WARMUP)])
            return model

        try:
            # A thread of its own, not the inference worker: batches go on
            # with the old model meanwhile.
            return await asyncio.to_thread(load_and_warm)
        except ClassifierError:
            raise
        except Exception as exc:
            raise ClassifierError(f"cannot load model {path!r}: {type(exc).__name__}: {exc}") from exc

    def _run_batch(self, items: list[_Item]) -> list[Classification | Exception]:
        # Runs in the worker thread. Requests are grouped by the model that
        # featurized them: one group, except across a hot swap.
        results: list[Classification | Exception | None] = [None] * len(items)
        groups: dict[int, tuple[ServiceModel, list[int]]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.model), (item.model, []))[1].append(i)
        for model, indexes in groups.values():
            features: list[npt.NDArray[Any]] = []
            slots: list[int] = []
            for i in indexes:
                item = items[i]
                if item.features is not None:
                    features.append(item.features)
                    slots.append(i)
                    continue
                assert item.raw is not None
                try:  # a large message, featurized here rather than on the loop
                    features.append(model.featurize(item.raw))
                    slots.append(i)
                except Exception as exc:  # one bad message fails alone
                    results[i] = ClassifierError(f"features failed: {type(exc).__name__}")
            if not features:
                continue
            predictions = model.predict(features)
            if len(predictions) != len(features):
                raise ClassifierError(
                    f"model returned {len(predictions)} results for {len(features)} inputs"
                )
            for i, prediction in zip(slots, predictions, strict=True):
                results[i] = prediction
        return [r if r is not None else ClassifierError("no result") for r in results]


__all__ = ["ModelLoader", "OnnxClassifierService", "ServiceModel", "load_onnx_model"]
