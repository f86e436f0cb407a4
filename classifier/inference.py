"""One batch of raw messages in, one verdict each out: the work of a batch.

Every runner does exactly this, so a verdict never depends on which one ran
it: load a model on the configured provider, featurize a batch (`featurize`),
run the model once on the arrays (`predict`), apply the auth adjustment and
the header-rule overrides (`finish`). The inference process
(classifier/worker_process.py) and the thread runner run all three in one
place (`classify_batch`); with the shared inference service
(classifier/serving/) a front-end worker featurizes and finishes and the
service only predicts.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import msgspec
import numpy.typing as npt
import structlog

from classifier.auth import adjust as auth_adjust
from classifier.overrides import apply_override, sure_category
from classifier.providers import ProviderChoice, ProviderError, choose_providers
from classifier.types import Classification, ClassifierError

log = structlog.get_logger("triaged.classifier")

# Warms a fresh session (first-run allocations) before it takes real traffic.
WARMUP_MESSAGE = b"From: warm@up.invalid\r\nSubject: warm-up\r\n\r\nwarm-up\r\n"

DEFAULT_LOADER = "classifier.inference:load_onnx_model"


class BatchModel(Protocol):
    """The part of classifier.model.LoadedModel a runner uses."""

    @property
    def name_version(self) -> str: ...

    def featurize(self, raw: bytes) -> npt.NDArray[Any]: ...

    def predict(self, batch: Sequence[npt.NDArray[Any]]) -> list[Classification]: ...


# (path, providers, intra_op_num_threads) -> a loaded model. Raises on a bad file.
ModelLoader = Callable[[str, ProviderChoice, int], BatchModel]


class BatchTiming(msgspec.Struct, frozen=True, array_like=True):
    """Where one batch's time went, wall and CPU clock of the thread that ran it."""

    features_s: float
    features_cpu_s: float
    model_s: float
    model_cpu_s: float


def load_onnx_model(path: str, choice: ProviderChoice, threads: int) -> BatchModel:
    """The default loader: classifier.model.load_model on the chosen providers."""
    # Imported late so the batcher and its tests do not depend on the model code.
    model_mod = importlib.import_module("classifier.model")
    loaded: BatchModel = model_mod.load_model(
        path, providers=choice.providers, intra_op_num_threads=threads
    )
    session = getattr(loaded, "session", None)
    if choice.kind == "cuda" and session is not None:
        used = session.get_providers()
        if not used or used[0] != "CUDAExecutionProvider":
            raise ProviderError(f"model session fell back to {used}")
    return loaded


def resolve_loader(ref: str) -> ModelLoader:
    """"package.module:function" -> the function (the inference process gets
    its loader by name: a function object cannot cross a process boundary)."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ClassifierError(f"model loader {ref!r} is not 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ClassifierError(f"model loader {ref!r}: {exc}") from None
    if not callable(fn):
        raise ClassifierError(f"model loader {ref!r} is not callable")
    loader: ModelLoader = fn
    return loader


def prefix_bytes_of(model: BatchModel) -> int | None:
    """How many leading bytes of a message the model's verdict depends on;
    None when the model does not say (it then gets whole messages).

    Features read `raw[:raw_max_bytes]` and nothing past it (the first line
    of classifier.features._prepare), and the overrides read the header
    block, which features cap far below that (header_max_bytes). So a message
    cut here gets the verdict of the whole message
    (tests/test_bounded_prefix.py checks it on the corpus), and the classifier
    never ships or holds more than this per message, however large the mail.
    """
    features = getattr(getattr(model, "manifest", None), "features", None)
    limit = getattr(features, "raw_max_bytes", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def labels_of(model: BatchModel) -> frozenset[str] | None:
    """The category head's classes, for the overrides; None when unknown."""
    labels = getattr(getattr(model, "manifest", None), "labels", None)
    return frozenset(labels) if isinstance(labels, list | tuple) else None


def spam_threshold_of(model: BatchModel) -> float | None:
    """The manifest's spam threshold, for the auth adjustment; None when unknown."""
    t = getattr(getattr(model, "manifest", None), "spam_threshold", None)
    return float(t) if isinstance(t, int | float) else None


def load_and_warm(
    path: str,
    provider: Literal["auto", "cpu", "cuda"],
    device_id: int,
    threads: int,
    loader: ModelLoader,
    shadow_path: str = "",
) -> tuple[BatchModel, ProviderChoice]:
    """Choose the provider, load `path` and run one warm-up message through it.

    "auto" whose probe passed but whose model session did not come up on CUDA
    (an op without a CUDA kernel, out of memory) falls back to CPU. Any other
    failure is a ClassifierError that says what went wrong.

    `shadow_path` (classifier.shadow_model_path): a second model loaded the
    same way and run beside this one (classifier/shadow.py). One that does
    not load, or reads other features, is logged and left out: the serving
    model is what mail needs.
    """
    choice = choose_providers(provider, device_id)
    try:
        model = _load_on(path, choice, threads, loader)
    except ProviderError as exc:
        if provider != "auto":
            raise
        log.warning("classifier.cuda_fallback", reason=str(exc))
        choice = choose_providers("cpu")
        model = _load_on(path, choice, threads, loader)
    if shadow_path:
        model = _with_shadow(model, shadow_path, choice, threads, loader)
    return model, choice


def _with_shadow(
    model: BatchModel, shadow_path: str, choice: ProviderChoice, threads: int, loader: ModelLoader
) -> BatchModel:
    from classifier.shadow import ShadowedModel

    try:
        shadowed = ShadowedModel(model, _load_on(shadow_path, choice, threads, loader), shadow_path)
    except ClassifierError as exc:
        log.error("classifier.shadow_unavailable", shadow=shadow_path, error=str(exc),
                  serving=model.name_version)
        return model
    log.info("classifier.shadow", shadow=shadowed.shadow.name_version, path=shadow_path,
             serving=model.name_version)
    return shadowed


def _load_on(path: str, choice: ProviderChoice, threads: int, loader: ModelLoader) -> BatchModel:
    try:
        model = loader(path, choice, threads)
        model.predict([model.featurize(WARMUP_MESSAGE)])
    except ClassifierError:
        raise
    except Exception as exc:
        raise ClassifierError(f"cannot load model {path!r}: {type(exc).__name__}: {exc}") from exc
    return model


class Featurized(msgspec.Struct):
    """A batch after feature extraction: what the model call needs, and what
    the overrides read afterwards (the raw prefixes)."""

    raws: list[bytes]  # the messages (prefixes) as bytes, in order
    features: list[npt.NDArray[Any]]  # one array per message that has features
    slots: list[int]  # features[k] belongs to raws[slots[k]]
    # Per message: None, or why it has no features (it alone fails).
    errors: list[ClassifierError | None]
    seconds: float = 0.0  # wall and thread-CPU time of the extraction
    cpu_seconds: float = 0.0


class Featurizer(Protocol):
    """The featurizing half of a model: what a front-end worker needs to turn
    messages into the model's input without loading the model itself."""

    def featurize(self, raw: bytes) -> npt.NDArray[Any]: ...


def featurize(featurizer: Featurizer, views: Sequence[bytes | memoryview]) -> Featurized:
    """Feature arrays for `views` (messages or their prefixes); a message
    whose features fail is marked and skipped, the rest go on."""
    t0, c0 = time.perf_counter(), time.thread_time()
    # Features and overrides search bytes; a view (a prefix, or a slice of
    # the frame the inference process received) is copied here once, and
    # only up to the model's prefix_bytes.
    raws = [v if isinstance(v, bytes) else bytes(v) for v in views]
    errors: list[ClassifierError | None] = [None] * len(raws)
    features, slots = _featurize(featurizer, raws, errors)
    return Featurized(raws, features, slots, errors,
                      time.perf_counter() - t0, time.thread_time() - c0)


def predict(model: BatchModel, features: Sequence[npt.NDArray[Any]]) -> list[Classification]:
    """One model call on feature arrays; ClassifierError when it answers the
    wrong number of rows (the call's own exceptions propagate)."""
    predictions = model.predict(features) if features else []
    if len(predictions) != len(features):
        raise ClassifierError(
            f"model returned {len(predictions)} results for {len(features)} inputs"
        )
    return predictions


class Postprocess(msgspec.Struct, frozen=True):
    """What the header-rule overrides and the auth adjustment need to know of
    the model and the site: the same whether the model ran here or elsewhere."""

    overrides: bool
    labels: frozenset[str] | None
    spam_threshold: float | None
    trusted: frozenset[str] = frozenset()


def postprocess_of(model: BatchModel, *, overrides: bool,
                   trusted: frozenset[str] = frozenset()) -> Postprocess:
    return Postprocess(overrides, labels_of(model), spam_threshold_of(model), trusted)


def finish(
    batch: Featurized,
    predictions: Sequence[Classification | ClassifierError],
    post: Postprocess,
) -> list[Classification | ClassifierError]:
    """The verdicts in message order: each prediction adjusted by trusted
    Authentication-Results and overridden by the sure header rules.

    `predictions[k]` belongs to `batch.slots[k]`; a ClassifierError there (the
    model failed on that message alone) is passed through.
    """
    if len(predictions) != len(batch.slots):
        raise ClassifierError(
            f"model returned {len(predictions)} results for {len(batch.slots)} inputs"
        )
    results: list[Classification | ClassifierError | None] = list(batch.errors)
    for i, prediction in zip(batch.slots, predictions, strict=True):
        if isinstance(prediction, ClassifierError):
            results[i] = prediction
            continue
        results[i] = finish_one(batch.raws[i], prediction, post)
    return [r if r is not None else ClassifierError("no result") for r in results]


def finish_one(raw: bytes, prediction: Classification, post: Postprocess) -> Classification:
    """One model verdict, adjusted by trusted Authentication-Results and
    overridden by the sure header rules (both read the message's header)."""
    if post.trusted and post.spam_threshold is not None:
        prediction = auth_adjust(prediction, raw, post.trusted, post.spam_threshold)
    if post.overrides:
        return apply_override(prediction, sure_category(raw), post.labels)
    return prediction


def classify_batch(
    model: BatchModel,
    views: Sequence[bytes | memoryview],
    *,
    overrides: bool,
    labels: frozenset[str] | None,
    trusted: frozenset[str] = frozenset(),
) -> tuple[list[Classification | ClassifierError], BatchTiming]:
    """Verdicts for `views` (messages or their prefixes), in order; one
    unparseable message fails alone.

    featurize -> predict -> finish: the same three steps the inference
    service splits between a front-end worker (featurize, finish) and the
    service (predict), so a verdict never depends on where it ran.

    Raises ClassifierError when the model call itself fails or answers the
    wrong number of rows: that fails the whole batch. `trusted`: authserv-ids
    whose Authentication-Results adjust the spam score (classifier/auth.py).
    """
    batch = featurize(model, views)
    t1, c1 = time.perf_counter(), time.thread_time()
    predictions = predict(model, batch.features)
    post = Postprocess(overrides, labels, spam_threshold_of(model), trusted)
    results = finish(batch, predictions, post)
    t2, c2 = time.perf_counter(), time.thread_time()
    timing = BatchTiming(batch.seconds, batch.cpu_seconds, t2 - t1, c2 - c1)
    return results, timing


def _featurize(
    model: Featurizer, raws: Sequence[bytes], errors: list[ClassifierError | None]
) -> tuple[list[npt.NDArray[Any]], list[int]]:
    """Feature arrays for the messages that have them, and their positions."""
    many = getattr(model, "featurize_many", None)
    if many is not None:
        try:
            # Shared numpy hashing passes: cheaper per message than one by one.
            return list(many(raws)), list(range(len(raws)))
        except Exception:
            pass  # one message broke the batch pass: find it below, alone
    features: list[npt.NDArray[Any]] = []
    slots: list[int] = []
    for i, raw in enumerate(raws):
        try:
            features.append(model.featurize(raw))
        except Exception as exc:
            errors[i] = ClassifierError(f"features failed: {type(exc).__name__}")
            continue
        slots.append(i)
    return features, slots


__all__ = [
    "DEFAULT_LOADER",
    "WARMUP_MESSAGE",
    "BatchModel",
    "BatchTiming",
    "Featurized",
    "Featurizer",
    "ModelLoader",
    "Postprocess",
    "classify_batch",
    "featurize",
    "finish",
    "finish_one",
    "labels_of",
    "load_and_warm",
    "load_onnx_model",
    "postprocess_of",
    "predict",
    "prefix_bytes_of",
    "resolve_loader",
]
