"""The one honest check on `classifier.features.extract` output.

`extract` never raises: when something inside fails it returns the ids of a
single "extract-error" token. Those ids are well formed, so a test that only
checks shape and range passes even when feature preparation always fails.
Every feature test goes through `features_of`, which fails on that sentinel
(and re-raises the inner exception so the traceback names the broken line).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from classifier import features
from classifier.features import FeatureParams, extract


def error_ids(params: FeatureParams) -> np.ndarray:
    """What `extract` returns when something inside raised: bytes(object()) fails."""
    return extract(cast(bytes, object()), params)


def is_error(ids: np.ndarray, params: FeatureParams) -> bool:
    sentinel = error_ids(params)
    return ids.shape == sentinel.shape and bool(np.array_equal(ids, sentinel))


def features_of(raw: bytes, params: FeatureParams) -> np.ndarray:
    """`extract(raw, params)`, failing the test if it fell back to the error token."""
    ids = extract(raw, params)
    if is_error(ids, params):
        features._extract(raw, params)  # re-raise inside the test
        pytest.fail(f"extract fell back to its error token for {raw[:200]!r}...")
    return ids
