"""`extract` (one message, the service's path) and `extract_many` (batches, the
evaluate path) hash by different code for speed; the ids must be the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from classifier.features import FeatureParams, extract, extract_many

SA = Path(__file__).resolve().parent.parent / "data-cache/spamassassin/package/data"

EDGE = [
    b"",
    b"\n\n",
    b"no header at all",
    b"Subject: x\r\n\r\nhello world",
    b"From: A <a@b.example>\nSubject: long body\n\n" + b"word " * 5000,
    b'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/html\n\n<p>Hi <a href="http://x.example">y</a></p>\n--b--\n',
]  # fmt: skip

PARAMS = [
    FeatureParams(),
    FeatureParams(bigrams=False),
    FeatureParams(max_body_tokens=5, struct_slots=4),
    FeatureParams(max_body_tokens=0, struct_slots=0),
    FeatureParams(buckets=1000, seed=7, text_max_bytes=100),
]


def _messages() -> list[bytes]:
    if not SA.is_dir():
        return EDGE
    return EDGE + [f.read_bytes() for f in sorted(SA.glob("*/*.txt"))[::25]]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: repr(p)[13:60])
def test_single_and_batched_ids_are_the_same(params: FeatureParams) -> None:
    raws = _messages()
    batched = extract_many(raws, params)
    assert len(batched) == len(raws)
    for raw, many in zip(raws, batched, strict=True):
        one = extract(raw, params)
        assert one.dtype == np.int64 and one.shape[0] >= params.struct_slots
        np.testing.assert_array_equal(one, many)


def test_batches_split_into_hashing_chunks_keep_order() -> None:
    # More bytes than one hashing pass: the rows must come back in input order.
    raws = [b"Subject: m%d\n\n" % i + b"tok%d " % i * 400 for i in range(200)]
    single = [extract(r, FeatureParams()) for r in raws]
    for a, b in zip(single, extract_many(raws, FeatureParams()), strict=True):
        np.testing.assert_array_equal(a, b)
