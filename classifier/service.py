"""The ONNX classifier service: what the proxy calls.

    service = OnnxClassifierService(settings.classifier, metrics=...)
    await service.start()            # provider probe + model load, off the loop
    verdict = await service.classify(raw)
    await service.reload()           # hot swap (SIGHUP), off the loop
    await service.close()            # drains the queue

Every message goes through one micro-batcher: features and inference both run
in its single worker thread, so the event loop only moves bytes. The model is
read once per batch, so a hot swap lands between batches: a batch never mixes
models and never sees one that is still loading.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy.typing as npt
import structlog

from classifier.batch_metrics import BatcherMetrics
from classifier.batcher import Batcher, BatcherClosed
from classifier.config import ClassifierSettings
from classifier.providers import ProviderChoice, ProviderError, choose_providers, log_choice
from classifier.types import Classification, ClassifierError

log = structlog.get_logger("triaged.classifier")

# Warms a fresh session (first-run allocations) before it takes real traffic.
_WARMUP = b"From: warm@up.invalid\r\nSubject: warm-up\r\n\r\nwarm-up\r\n"


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


class OnnxClassifierService:
    def __init__(
        self,
        settings: ClassifierSettings,
        *,
        metrics: BatcherMetrics | None = None,
        loader: ModelLoader | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._loader: ModelLoader = loader if loader is not None else load_onnx_model
        self._path = settings.model_path
        self._model: ServiceModel | None = None
        self._choice: ProviderChoice | None = None
        self._batcher: Batcher[bytes, Classification] | None = None
        self._reload_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._batcher is not None:
            return
        s = self._settings
        self._choice = await asyncio.to_thread(choose_providers, s.provider, s.device_id)
        self._model = await self._load(self._path)
        self._batcher = Batcher(
            self._run_batch, s.batcher, timeout_ms=s.timeout_ms, metrics=self._metrics
        )
        await self._batcher.start()
        log_choice(self._choice, self._model.name_version)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close(drain=True)

    async def classify(self, raw: bytes) -> Classification:
        batcher = self._batcher
        if batcher is None:
            raise BatcherClosed("classifier is not running")
        return await batcher.submit(raw)

    async def reload(self, path: str | None = None) -> str:
        """Load `path` (default: the current model file) and swap it in.

        The old model keeps answering while the new one loads in a thread;
        on failure the old model stays and the error is raised.
        """
        async with self._reload_lock:
            target = path if path is not None else self._path
            new = await self._load(target)
            # Plain assignment on the loop thread; the worker reads the
            # reference once at the start of each batch.
            self._model, self._path = new, target
            log.info("classifier.reloaded", model=new.name_version)
            return new.name_version

    # -- introspection -----------------------------------------------------

    @property
    def model_name(self) -> str | None:
        return self._model.name_version if self._model is not None else None

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

    def _run_batch(self, raws: list[bytes]) -> list[Classification | Exception]:
        # Runs in the worker thread. One model reference for the whole batch.
        model = self._model
        assert model is not None
        results: list[Classification | Exception | None] = [None] * len(raws)
        features: list[npt.NDArray[Any]] = []
        slots: list[int] = []
        for i, raw in enumerate(raws):
            try:
                features.append(model.featurize(raw))
                slots.append(i)
            except Exception as exc:  # one bad message fails alone
                results[i] = ClassifierError(f"features failed: {type(exc).__name__}")
        if features:
            predictions = model.predict(features)
            if len(predictions) != len(features):
                raise ClassifierError(
                    f"model returned {len(predictions)} results for {len(features)} inputs"
                )
            for i, prediction in zip(slots, predictions, strict=True):
                results[i] = prediction
        return [r if r is not None else ClassifierError("no result") for r in results]


__all__ = ["ModelLoader", "OnnxClassifierService", "ServiceModel", "load_onnx_model"]
