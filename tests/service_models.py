"""Echo models for the inference service tests (classifier/serving/).

Like tests/batching_models.EchoModel (raw b"17" -> category "17", through a
real ONNX session), plus what a served model needs: a FeatureSpec, so the
worker featurizes. The spec's `shift` is the model's offset and the features
carry it, so arrays built for another model's spec give wrong categories:
a stale request that ran through a new model would be caught.
A row for message b"666" makes the whole model call raise (the service then
runs that batch one by one); one for b"777" makes it hang.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from batching_models import DIM, EchoModel

from classifier.providers import Provider, ProviderChoice
from classifier.serving.feature_spec import FeatureSpec
from classifier.types import Classification

POISON = 666
HANG = 777  # a row for this message makes the model call hang


class EchoFeaturizer:
    def __init__(self, shift: float) -> None:
        self.shift = shift

    def featurize(self, raw: bytes) -> np.ndarray:
        if raw == b"unparseable":
            raise ValueError("cannot featurize")
        value = float(int(raw)) if raw.isdigit() else -1.0
        return np.full(DIM, value + self.shift, dtype=np.float32)


def echo_featurizer(params: dict[str, Any]) -> EchoFeaturizer:
    return EchoFeaturizer(float(params["shift"]))


class ServedEcho(EchoModel):
    def __init__(self, path: str | Path, providers: Sequence[Provider] | None = None) -> None:
        super().__init__(path, providers)
        self.feature_spec = FeatureSpec("service_models:echo_featurizer", {"shift": self.offset})
        self._features = EchoFeaturizer(self.offset)

    def featurize(self, raw: bytes) -> np.ndarray:
        return self._features.featurize(raw)

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        y = self.session.run(self.outputs, {"x": np.stack(batch)})[0]
        values = [round(float(v - 2 * self.offset)) for v in y[:, 0]]
        if POISON in values:
            raise RuntimeError("poisoned row")
        if HANG in values:
            time.sleep(3600)
        return [Classification(category=str(v), score=1.0, model=self.name_version)
                for v in values]


def load_served_echo(path: str, choice: ProviderChoice, threads: int) -> ServedEcho:
    del threads
    return ServedEcho(path, choice.providers)
