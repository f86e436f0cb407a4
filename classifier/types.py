"""The classifier's vocabulary, shared by every classifier and the proxy."""

from __future__ import annotations

from typing import Protocol

import msgspec


class ShadowVerdict(msgspec.Struct, frozen=True):
    """What the shadow model (classifier.shadow_model_path) said of the same
    message, beside the serving model: reported in events and metrics, never
    stamped. Compared before the header-rule overrides and the auth
    adjustment, which would treat both models alike."""

    model: str  # "name/version" of the shadow model
    category: str
    spam: bool | None
    same_category: bool  # the serving model's own category agrees
    same_spam: bool  # the serving model's own spam decision agrees


class Classification(msgspec.Struct, frozen=True):
    """One message's verdict from a classifier.

    `spam` and `spam_score` are None when the classifier has no spam opinion
    (the header rules have none); the proxy then stamps no spam headers.
    """

    category: str
    score: float  # confidence of `category`, 0..1
    model: str  # "name/version", stamped into X-Triage-Model
    spam: bool | None = None
    spam_score: float | None = None
    shadow: ShadowVerdict | None = None  # only while a shadow model runs


class ClassifierError(Exception):
    """Classification failed. The ONNX service answers it with its header-rules
    fallback, except Overloaded; what reaches the proxy gets `on_classifier_error`."""


class Overloaded(ClassifierError):
    """The classifier's queue is full: answered at once, never waited on."""


class DeadlineExceeded(ClassifierError):
    """The request's deadline passed before it was run."""


class Classifier(Protocol):
    """What the proxy calls. Rules and the ONNX service both implement it."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def classify(self, raw: bytes) -> Classification: ...
