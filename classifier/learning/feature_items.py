"""Feedback known only by its feature ids: what a feedback event carries.

A site with many hosts learns on one learner host from the feedback events
every host ships (proxy/feedback_events.py). Events never carry a message
(DESIGN convention 8), so such an item holds the hashed feature ids the
model reads, and the digest of the feature parameters that made them: ids
hashed under other parameters mean other tokens, so `ids_for` leaves them out
(counted) rather than train on noise. The price of the privacy: such an item
cannot be re-featurised for a model with a new feature version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from classifier.features import FeatureParams, IdArray, extract_many


class FeatureIds(msgspec.Struct, frozen=True, array_like=True):
    params: str  # params_digest() of the parameters the ids were hashed with
    struct: list[int]  # the structure ids (non-zero), in slot order
    text: list[int]  # the text ids


def params_digest(params: FeatureParams) -> str:
    """Short digest of every feature parameter (version, buckets, salt, limits)."""
    return hashlib.sha256(msgspec.json.encode(params)).hexdigest()[:16]


def split_ids(ids: IdArray, params: FeatureParams) -> tuple[list[int], list[int]]:
    s = params.struct_slots
    return ids[:s][ids[:s] > 0].tolist(), ids[s:][ids[s:] > 0].tolist()


def join_ids(struct: Sequence[int], text: Sequence[int], params: FeatureParams) -> IdArray:
    a = np.zeros(params.struct_slots + len(text), dtype=np.int64)
    n = min(len(struct), params.struct_slots)
    a[:n] = np.asarray(struct[:n], dtype=np.int64)
    a[params.struct_slots :] = np.asarray(text, dtype=np.int64)
    return np.clip(a, 0, params.buckets - 1)  # ids from the wire: never index past the table


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(FeatureIds)


def encode(struct: Sequence[int], text: Sequence[int], params: FeatureParams) -> bytes:
    return _enc.encode(FeatureIds(params_digest(params), list(struct), list(text)))


def ids_for(items: Sequence[Any], params: FeatureParams) -> tuple[list[IdArray], list[bool]]:
    """(ids, usable) per item: messages are featurised without our X-Triage-*
    fields; feature items are decoded, unusable when hashed under other parameters."""
    from classifier.learning.learn import unstamped

    digest = params_digest(params)
    out: list[IdArray | None] = [None] * len(items)
    msgs = [i for i, it in enumerate(items) if getattr(it, "form", "message") == "message"]
    for i, ids in zip(msgs, extract_many([unstamped(items[i].raw) for i in msgs], params), strict=True):
        out[i] = ids
    empty = np.zeros(params.struct_slots, dtype=np.int64)
    usable = [True] * len(items)
    for i, it in enumerate(items):
        if out[i] is not None:
            continue
        try:
            f = _dec.decode(it.raw)
        except msgspec.DecodeError:
            f = None
        if f is None or f.params != digest:
            usable[i] = False
            out[i] = empty
        else:
            out[i] = join_ids(f.struct, f.text, params)
    return [a if a is not None else empty for a in out], usable


__all__ = ["FeatureIds", "encode", "ids_for", "join_ids", "params_digest", "split_ids"]
