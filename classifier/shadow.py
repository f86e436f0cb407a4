"""Shadow mode: a candidate model classifies live mail beside the serving one.

`ShadowedModel` answers with the serving model's verdicts, each carrying the
shadow's (`Classification.shadow`); the proxy reports those in events and
metrics and stamps nothing of them. Both models read the same feature
arrays, so a message is featurized once: a shadow hashed with other
FeatureParams is refused at load. The shadow never costs a verdict: when its
call fails, the batch goes on without shadow verdicts (one log line per
failure spell).

Every runner loads models through `inference.load_and_warm`, which wraps the
serving model here when `classifier.shadow_model_path` is set; so the
inference process, the thread runner and the shared inference service all
run the shadow the same way, and its verdicts travel back inside the
serving model's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy.typing as npt
import structlog

from classifier.types import Classification, ClassifierError, ShadowVerdict

log = structlog.get_logger("triaged.classifier")

FAILURE_LOG_EVERY_S = 60.0  # one log line per spell of shadow failures, at most this often


class ShadowedModel:
    """The serving model, with `shadow` classifying the same batches.
    ClassifierError when the shadow cannot run beside it (check_compatible)."""

    def __init__(self, serving: Any, shadow: Any, shadow_path: str) -> None:
        check_compatible(serving, shadow, shadow_path)
        self.serving = serving
        self.shadow = shadow
        self.shadow_path = shadow_path
        self._failing_since = 0.0  # monotonic; 0: the shadow answers
        self._last_log = 0.0

    # The serving model's identity and features: what the runners read.
    @property
    def name_version(self) -> str:
        return str(self.serving.name_version)

    @property
    def manifest(self) -> Any:
        return getattr(self.serving, "manifest", None)

    @property
    def feature_spec(self) -> Any:  # the inference service's serving/feature_spec.spec_of
        return getattr(self.serving, "feature_spec", None)

    def featurize(self, raw: bytes) -> npt.NDArray[Any]:
        return self.serving.featurize(raw)  # type: ignore[no-any-return]

    def featurize_many(self, raws: Sequence[bytes]) -> list[npt.NDArray[Any]]:
        many = getattr(self.serving, "featurize_many", None)
        if many is None:
            return [self.serving.featurize(r) for r in raws]
        return list(many(raws))

    def predict(self, batch: Sequence[npt.NDArray[Any]]) -> list[Classification]:
        verdicts: list[Classification] = self.serving.predict(batch)
        try:
            theirs: list[Classification] = self.shadow.predict(batch)
            if len(theirs) != len(verdicts):
                raise ClassifierError(f"{len(theirs)} results for {len(verdicts)} inputs")
        except Exception as exc:  # the shadow must never cost a verdict
            self._failed(exc)
            return verdicts
        if self._failing_since:
            log.info("classifier.shadow_recovered", shadow=self.shadow_path)
            self._failing_since = 0.0
        return [
            msgspec.structs.replace(
                ours,
                shadow=ShadowVerdict(
                    model=s.model,
                    category=s.category,
                    spam=s.spam,
                    same_category=s.category == ours.category,
                    same_spam=s.spam == ours.spam,
                ),
            )
            for ours, s in zip(verdicts, theirs, strict=True)
        ]

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if not self._failing_since:
            self._failing_since = now
        if now - self._last_log >= FAILURE_LOG_EVERY_S:
            self._last_log = now
            log.warning("classifier.shadow_failed", shadow=self.shadow_path,
                        error=f"{type(exc).__name__}: {exc}")


def check_compatible(serving: Any, shadow: Any, shadow_path: str) -> None:
    """ClassifierError unless `shadow` reads the serving model's features
    (the same FeatureParams) and has its categories; models without a
    manifest (test doubles) are taken as they are."""
    ours = getattr(getattr(serving, "manifest", None), "features", None)
    theirs = getattr(getattr(shadow, "manifest", None), "features", None)
    if ours is not None and theirs is not None and ours != theirs:
        raise ClassifierError(
            f"shadow model {shadow_path!r} reads other features than the serving model "
            "(feature parameters differ): a shadow must share its features"
        )
    labels = getattr(getattr(serving, "manifest", None), "labels", None)
    shadow_labels = getattr(getattr(shadow, "manifest", None), "labels", None)
    if labels is not None and shadow_labels is not None and list(labels) != list(shadow_labels):
        raise ClassifierError(
            f"shadow model {shadow_path!r} has other categories ({list(shadow_labels)}) "
            f"than the serving model ({list(labels)})"
        )


__all__ = ["ShadowedModel", "check_compatible"]
