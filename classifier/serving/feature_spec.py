"""What a front-end worker needs to featurize for a model it has not loaded.

With the shared inference service, workers compute features (parsing is the
expensive, GIL-bound part and must scale with the workers) and the service
only runs the model. A worker learns the model's FeatureSpec from the service,
and every request says which spec (`FeatureSpec.id`) its arrays were built
for, so a hot swap to a model with other features can never run arrays built
for the old one (classifier/serving/inference_server.py answers them Stale).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Sequence
from typing import Any

import msgspec

from classifier.features import FeatureParams, IdArray, extract, extract_many
from classifier.inference import BatchModel, Featurizer
from classifier.types import ClassifierError

# The featurizer of every model `triaged train` builds: classifier/features.py
# with the manifest's FeatureParams.
DEFAULT_FEATURIZER = "classifier.serving.feature_spec:triaged_featurizer"


class FeatureSpec(msgspec.Struct, frozen=True):
    # "module:function": called with `params`, returns a Featurizer.
    featurizer: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def id(self) -> str:
        """Equal for equal specs, whatever process computed it."""
        blob = msgspec.json.encode(self, order="sorted")
        return hashlib.sha256(blob).hexdigest()[:16]


class TriagedFeaturizer:
    """classifier/features.py with one model's FeatureParams."""

    def __init__(self, params: FeatureParams) -> None:
        self.params = params

    def featurize(self, raw: bytes) -> IdArray:
        return extract(raw, self.params)

    def featurize_many(self, raws: Sequence[bytes]) -> list[IdArray]:
        return extract_many(raws, self.params)


def triaged_featurizer(params: dict[str, Any]) -> TriagedFeaturizer:
    try:
        return TriagedFeaturizer(msgspec.convert(params, FeatureParams))
    except msgspec.ValidationError as exc:
        raise ClassifierError(f"feature params: {exc}") from None


def spec_of(model: BatchModel) -> FeatureSpec:
    """The model's spec: its own `feature_spec` when it has one, else the
    FeatureParams of its manifest (every triaged model has them)."""
    own = getattr(model, "feature_spec", None)
    if isinstance(own, FeatureSpec):
        return own
    params = getattr(getattr(model, "manifest", None), "features", None)
    if isinstance(params, FeatureParams):
        return FeatureSpec(DEFAULT_FEATURIZER, msgspec.to_builtins(params))
    raise ClassifierError(
        f"model {model.name_version} says nothing of its features: the inference service "
        "cannot have workers featurize for it"
    )


@functools.lru_cache(maxsize=8)
def _featurizer(blob: bytes) -> Featurizer:
    spec = msgspec.json.decode(blob, type=FeatureSpec)
    module, _, attr = spec.featurizer.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ClassifierError(f"featurizer {spec.featurizer!r}: {exc}") from None
    made: Any = factory(spec.params)
    if not callable(getattr(made, "featurize", None)):
        raise ClassifierError(f"featurizer {spec.featurizer!r} returned no featurize()")
    featurizer: Featurizer = made
    return featurizer


def featurizer_for(spec: FeatureSpec) -> Featurizer:
    """The Featurizer a spec names (cached: a worker builds it once per spec)."""
    return _featurizer(msgspec.json.encode(spec, order="sorted"))
