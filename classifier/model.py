"""Load an ONNX model with its manifest, featurise, predict a batch.

The graph (built by `classifier.train`): input `ids` int64 [N, L], 0-padded
token ids -> mean of embeddings -> `category_probs` [N, C] (softmax) and
`spam_prob` [N, 1] (sigmoid). The manifest is JSON in the ONNX file's
metadata_props under `triaged.manifest`; it is read through onnxruntime, so
loading needs no `onnx` package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Final

import msgspec
import numpy as np

from classifier.features import FEATURE_VERSION, FeatureParams, IdArray, extract, extract_many
from classifier.types import Classification

MANIFEST_KEY: Final = "triaged.manifest"
MANIFEST_FORMAT: Final = 1


class ModelError(Exception):
    """The model file cannot be used; the message says why."""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    name: str
    version: str
    labels: list[str]  # category head's classes, in output order
    features: FeatureParams
    spam_label: str = "spam"
    spam_threshold: float = 0.5
    format: int = MANIFEST_FORMAT
    created: str = ""
    training: dict[str, Any] = msgspec.field(default_factory=dict)  # data summary
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)  # held-out metrics


def encode_manifest(m: Manifest) -> str:
    return msgspec.json.encode(m).decode()


def decode_manifest(text: str, path: str = "model") -> Manifest:
    """Check the feature version before anything else, so a mismatch says so plainly."""
    try:
        raw = json.loads(text)
        version = raw["features"]["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path}: manifest is not valid JSON with features.version ({exc})"
        ) from None
    if version != FEATURE_VERSION:
        raise ModelError(
            f"{path}: built for feature version {version}, but this triaged extracts "
            f"version {FEATURE_VERSION}; retrain it with `triaged train` (or use a matching release)"
        )
    try:
        return msgspec.json.decode(text, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ModelError(f"{path}: bad manifest: {exc}") from None


class LoadedModel:
    """An inference session and its manifest. `predict` runs from one thread at a time."""

    def __init__(self, session: Any, manifest: Manifest, path: str) -> None:
        self.session = session
        self.manifest = manifest
        self.path = path
        self.name_version = f"{manifest.name}/{manifest.version}"
        self._labels = list(manifest.labels)
        self._threshold = float(manifest.spam_threshold)

    def featurize(self, raw: bytes) -> IdArray:
        return extract(raw, self.manifest.features)

    def featurize_many(self, raws: Sequence[bytes]) -> list[IdArray]:
        """Same ids as `featurize`, hashed in shared numpy passes (faster in bulk)."""
        return extract_many(raws, self.manifest.features)

    def run(self, batch: Sequence[IdArray]) -> tuple[np.ndarray, np.ndarray]:
        """(category_probs [N, C], spam_prob [N]) for a batch of featurised messages."""
        n = len(batch)
        # At least the structure slots, so the graph's two slices are well formed.
        width = max(
            max((a.shape[0] for a in batch), default=1), self.manifest.features.struct_slots + 1
        )
        ids = np.zeros((n, width), dtype=np.int64)  # 0 is padding: a zero embedding row
        for i, a in enumerate(batch):
            ids[i, : a.shape[0]] = a
        cat, spam = self.session.run(["category_probs", "spam_prob"], {"ids": ids})
        return np.asarray(cat), np.asarray(spam).reshape(n)

    def predict(self, batch: Sequence[IdArray]) -> list[Classification]:
        if not batch:
            return []
        cat, spam = self.run(batch)
        best = cat.argmax(axis=1)
        out = []
        for i in range(len(batch)):
            s = float(spam[i])
            out.append(
                Classification(
                    category=self._labels[int(best[i])],
                    score=round(float(cat[i, best[i]]), 4),
                    model=self.name_version,
                    spam=s >= self._threshold,
                    spam_score=round(s, 4),
                )
            )
        return out


def load_model(
    path: str, *, providers: list[str] | None = None, intra_op_num_threads: int = 1
) -> LoadedModel:
    """Open `path`, check its manifest and graph; ModelError says what is wrong."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_num_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(
            path, sess_options=opts, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelError(
            f"{path}: not a usable ONNX model ({str(exc).splitlines()[0][:200]})"
        ) from None
    meta = session.get_modelmeta().custom_metadata_map
    if MANIFEST_KEY not in meta:
        raise ModelError(f"{path}: no triaged manifest in the ONNX metadata ({MANIFEST_KEY})")
    manifest = decode_manifest(meta[MANIFEST_KEY], path)
    names_in = [i.name for i in session.get_inputs()]
    names_out = {o.name for o in session.get_outputs()}
    if names_in != ["ids"] or not {"category_probs", "spam_prob"} <= names_out:
        raise ModelError(
            f"{path}: graph has inputs {names_in} / outputs {sorted(names_out)}, not a triaged model"
        )
    shape = session.get_outputs()[
        [o.name for o in session.get_outputs()].index("category_probs")
    ].shape
    if isinstance(shape[-1], int) and shape[-1] != len(manifest.labels):
        raise ModelError(
            f"{path}: {shape[-1]} category outputs but {len(manifest.labels)} labels in the manifest"
        )
    return LoadedModel(session, manifest, path)


__all__ = [
    "MANIFEST_KEY",
    "LoadedModel",
    "Manifest",
    "ModelError",
    "decode_manifest",
    "encode_manifest",
    "load_model",
]
