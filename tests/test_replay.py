"""The replay sample shipped with the model (classifier/learning/replay.py):
it fits the bundled model, covers every class, holds ids not text, round-trips,
and a sample for other features or a damaged file is refused with a clear error."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from classifier.features import FeatureParams
from classifier.learning import replay
from classifier.model import load_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/default.onnx"


def manifest():  # type: ignore[no-untyped-def]
    return load_model(str(MODEL)).manifest


def test_the_bundled_sample_fits_the_bundled_model() -> None:
    """Fails when the model is rebuilt on new features without `default_recipe.py replay`."""
    m = manifest()
    s = replay.load(replay.BUNDLED, m.features, m.labels)
    assert replay.find_sample(MODEL) == replay.BUNDLED
    assert 1000 <= len(s) <= 5000
    assert replay.BUNDLED.stat().st_size < 2_000_000  # small enough to commit and ship
    assert set(s.cat.tolist()) == {-1, *range(len(m.labels))}  # every category, and spam
    assert 0.1 < float(s.spam.mean()) < 0.6
    assert all(a.shape[0] >= m.features.struct_slots for a in s.ids)
    assert all(int(a.max()) < m.features.buckets for a in s.ids)
    # What the file says about itself: where it came from and the strata, no message fields.
    assert s.meta["origin"] and s.meta["strata"]
    assert not {"raw", "text", "subject", "from", "message_id"} & set(s.meta)


def test_round_trip_keeps_every_id(tmp_path: Path) -> None:
    p = FeatureParams()
    rng = np.random.default_rng(3)
    ids = []
    for n in (0, 5, 400):
        a = np.zeros(p.struct_slots + n, dtype=np.int64)
        a[:7] = rng.integers(1, p.buckets, 7)
        a[p.struct_slots :] = rng.integers(1, p.buckets, n)
        ids.append(a)
    s = replay.build_sample(ids, ["forums", None, "updates"], [False, True, False], ["a", "b", "c"],
                            p, ["forums", "primary", "promotions", "updates"], text_ids=100)  # fmt: skip
    replay.save(s, tmp_path / "r.npz")
    back = replay.load(tmp_path / "r.npz", p, ["forums", "primary", "promotions", "updates"])
    assert back.cat.tolist() == [0, -1, 3] and back.spam.tolist() == [0.0, 1.0, 0.0]
    for a, b in zip(s.ids, back.ids, strict=True):
        assert np.array_equal(a, b)
    assert back.ids[2].shape[0] == p.struct_slots + 100  # text ids capped, drawn at random
    assert set(back.ids[2][p.struct_slots :].tolist()) <= set(ids[2][p.struct_slots :].tolist())


def test_strata_are_capped_alike() -> None:
    assert replay._allocate({"a": 10, "b": 1000, "c": 50}, 100) == {"a": 10, "b": 45, "c": 45}
    assert replay._allocate({"a": 3}, 100) == {"a": 3}


def test_a_sample_for_other_features_or_labels_is_refused(tmp_path: Path) -> None:
    m = manifest()
    s = replay.load(replay.BUNDLED, m.features, m.labels)
    other = msgspec.structs.replace(m.features, seed=m.features.seed + 1)
    with pytest.raises(replay.ReplayError, match="other feature parameters"):
        replay.load(replay.BUNDLED, other, m.labels)
    with pytest.raises(replay.ReplayError, match="labels"):
        replay.load(replay.BUNDLED, m.features, [*m.labels, "social"])
    old = msgspec.structs.replace(s, meta={**s.meta, "features": {**s.meta["features"], "version": 1}})
    replay.save(old, tmp_path / "old.npz")
    with pytest.raises(replay.ReplayError, match="built for feature version 1, the model uses"):
        replay.load(tmp_path / "old.npz", m.features, m.labels)
    (tmp_path / "bad.npz").write_bytes(replay.BUNDLED.read_bytes()[:5000])
    with pytest.raises(replay.ReplayError, match="not a readable replay sample"):
        replay.load(tmp_path / "bad.npz", m.features, m.labels)
    with pytest.raises(replay.ReplayError, match="not a readable"):
        replay.load(tmp_path / "missing.npz", m.features, m.labels)


def test_rehearsal_follows_the_spam_tower() -> None:
    """A model with its own spam layer (TrainConfig.spam_hidden): the replay's
    distillation reads the spam head through that layer, as the graph does."""
    from classifier.features import extract
    from classifier.learning.learn import LearnConfig, finetune
    from classifier.train import TrainConfig, fit

    p = FeatureParams()
    raws = [b"From: a%d@b.example\r\nSubject: s%d\r\n\r\nhello %d world\r\n" % (i, i, i) for i in range(16)]
    ids = [extract(r, p) for r in raws]
    cat = np.array([0, 1] * 8, dtype=np.int64)
    spam = np.array([0.0, 1.0] * 8, dtype=np.float32)
    w = fit(ids, cat, spam, 2, p, TrainConfig(dim=8, epochs=1, min_steps=4, hidden=6, spam_hidden=5),
            progress=False)  # fmt: skip
    out = finetune(w, ids[:4], cat[:4], spam[:4], np.ones(4, np.float32), p.struct_slots,
                   LearnConfig(epochs=1, min_steps=2, replay_batch=8), replay=ids,
                   replay_targets=(cat, spam))  # fmt: skip
    # Read through the category layer (width 6), the 5-wide spam head would not even run.
    assert out.w_hid_spam is not None and out.w_hid_spam.shape == (16, 5)
