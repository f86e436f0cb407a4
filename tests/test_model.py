"""load_model's checks, predict's batching, the ONNX graph against its numpy twin."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from classifier.features import FEATURE_VERSION, FeatureParams
from classifier.model import Manifest, ModelError, load_model
from classifier.train import Weights, build_onnx, forward, quantize_int8, save_onnx
from classifier.types import Classification

PLAIN = b"From: Alice <alice@example.org>\nSubject: Lunch?\n\nShall we have lunch on Friday?\n"
LIST = (
    b"From: Carol <carol@lists.example.org>\nSubject: [dev] Re: build breaks\n"
    b"List-Id: <dev.lists.example.org>\nList-Post: <mailto:dev@lists.example.org>\n"
    b"List-Unsubscribe: <mailto:dev-leave@lists.example.org>\nPrecedence: list\n\n"
    b"The build breaks on arm64 since the last commit, see the log.\n"
)

ROOT = Path(__file__).resolve().parent.parent
P = FeatureParams(buckets=4096)
LABELS = ["alpha", "beta", "gamma"]


def _weights(hidden: int = 0, seed: int = 0, spam_hidden: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    d = 8
    emb = rng.normal(size=(P.buckets, d)).astype(np.float32)
    emb[0] = 0
    width = hidden or 2 * d
    return Weights(
        emb=emb,
        w_hid=rng.normal(size=(2 * d, hidden)).astype(np.float32) if hidden else None,
        b_hid=rng.normal(size=hidden).astype(np.float32) if hidden else None,
        w_cat=rng.normal(size=(width, len(LABELS))).astype(np.float32),
        b_cat=rng.normal(size=len(LABELS)).astype(np.float32),
        w_spam=rng.normal(size=(spam_hidden or width, 1)).astype(np.float32),
        b_spam=np.zeros(1, np.float32),
        # The spam tower (TrainConfig.spam_hidden): its own layer over the two means.
        w_hid_spam=rng.normal(size=(2 * d, spam_hidden)).astype(np.float32) if spam_hidden else None,
        b_hid_spam=rng.normal(size=spam_hidden).astype(np.float32) if spam_hidden else None,
    )


def _manifest(params: FeatureParams = P, labels: list[str] = LABELS) -> Manifest:
    return Manifest(name="t", version="9", labels=labels, features=params, spam_threshold=0.5)


def _save(tmp_path: Path, w: Weights, m: Manifest, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    save_onnx(build_onnx(w, m), path)
    return path


@pytest.mark.parametrize(("hidden", "spam_hidden"), [(0, 0), (6, 0), (6, 5)])
def test_graph_matches_numpy_and_predict_shapes(tmp_path: Path, hidden: int, spam_hidden: int) -> None:
    w = _weights(hidden, spam_hidden=spam_hidden)
    model = load_model(str(_save(tmp_path, w, _manifest())))
    assert model.name_version == "t/9"
    batch = [model.featurize(PLAIN), model.featurize(LIST), model.featurize(b"")]
    cat, spam = model.run(batch)
    ref_cat, ref_spam = forward(w, batch, P.struct_slots)
    np.testing.assert_allclose(cat, ref_cat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spam, ref_spam, rtol=1e-4, atol=1e-5)
    out = model.predict(batch)
    assert len(out) == 3 and all(isinstance(c, Classification) for c in out)
    for c, row, s in zip(out, cat, spam, strict=True):
        assert c.category == LABELS[int(row.argmax())]
        assert c.spam == (s >= 0.5) and c.model == "t/9"
        assert 0.0 <= c.score <= 1.0
    # Padding is inert: a message predicts the same alone and next to a long one.
    alone = model.run([batch[0]])
    np.testing.assert_allclose(alone[0][0], cat[0], rtol=1e-5, atol=1e-6)
    assert model.predict([]) == []


def test_int8_is_close_and_smaller(tmp_path: Path) -> None:
    src = _save(tmp_path, _weights(), _manifest())
    dst = tmp_path / "m-int8.onnx"
    quantize_int8(src, dst)
    fp32, int8 = load_model(str(src)), load_model(str(dst))
    assert int8.name_version == "t/9-int8"
    assert dst.stat().st_size < src.stat().st_size / 2
    batch = [fp32.featurize(PLAIN), fp32.featurize(LIST)]
    np.testing.assert_allclose(fp32.run(batch)[0], int8.run(batch)[0], atol=0.1)


def test_refuses_feature_version_mismatch(tmp_path: Path) -> None:
    old = msgspec.structs.replace(P, version=FEATURE_VERSION + 1)
    path = _save(tmp_path, _weights(), _manifest(old))
    with pytest.raises(ModelError, match=rf"feature version {FEATURE_VERSION + 1}.*retrain"):
        load_model(str(path))


def test_refuses_missing_bad_and_manifestless_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        load_model(str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="not a usable ONNX model"):
        load_model(str(bad))
    import onnx

    m = build_onnx(_weights(), _manifest())
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save_model(m, str(bare))
    with pytest.raises(ModelError, match="no triaged manifest"):
        load_model(str(bare))


def test_refuses_label_count_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path, _weights(), _manifest(labels=["only", "two"]))
    with pytest.raises(ModelError, match="3 category outputs but 2 labels"):
        load_model(str(path))


def test_default_model_loads_and_classifies() -> None:
    path = ROOT / "models/default.onnx"  # committed: missing is a failure, not a skip
    model = load_model(str(path))
    assert set(model.manifest.labels) == {"primary", "promotions", "updates", "forums"}
    assert model.manifest.features.version == FEATURE_VERSION
    listmail, person = model.predict([model.featurize(LIST), model.featurize(PLAIN)])
    assert listmail.category == "forums"
    assert listmail.spam is False and person.spam is False


def test_spam_tower_trains_exports_and_warm_starts(tmp_path: Path) -> None:
    """TrainConfig.spam_hidden: the spam head gets a hidden layer of its own; the
    ONNX graph, the numpy twin and `triaged learn`'s warm start agree on it, and
    the per-message spam weight reaches the spam loss only."""
    from classifier.learning.learn import read_model
    from classifier.train import TrainConfig, fit

    raws = [PLAIN, LIST] * 8
    ids = [extract_ids(r) for r in raws]
    cat = np.array([0, 1] * 8, dtype=np.int64)
    spam = np.array([0.0, 1.0] * 8, dtype=np.float32)
    cfg = TrainConfig(dim=8, epochs=2, min_steps=20, hidden=6, spam_hidden=5)
    w = fit(ids, cat, spam, 2, P, cfg, progress=False)
    assert w.w_hid_spam is not None and w.w_hid_spam.shape == (16, 5) and w.w_spam.shape == (5, 1)
    assert w.w_hid is not None and w.w_cat.shape == (6, 2)
    path = _save(tmp_path, w, _manifest(labels=["a", "b"]))
    model = load_model(str(path))
    got_cat, got_spam = model.run(ids[:2])
    ref_cat, ref_spam = forward(w, ids[:2], P.struct_slots)
    np.testing.assert_allclose(got_cat, ref_cat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_spam, ref_spam, rtol=1e-4, atol=1e-5)
    back, _ = read_model(path)
    assert back.w_hid_spam is not None and np.array_equal(back.w_hid_spam, w.w_hid_spam)
    # The per-message spam weight scales the spam loss: at 0 the spam labels
    # change nothing at all; at 1 they do.
    zero = np.zeros(16, np.float32)
    w0 = fit(ids, cat, spam, 2, P, cfg, progress=False, spam_weight=zero)
    w0_flipped = fit(ids, cat, 1.0 - spam, 2, P, cfg, progress=False, spam_weight=zero)
    for a, b in ((w0.emb, w0_flipped.emb), (w0.w_cat, w0_flipped.w_cat), (w0.w_spam, w0_flipped.w_spam)):
        np.testing.assert_array_equal(a, b)
    w1_flipped = fit(ids, cat, 1.0 - spam, 2, P, cfg, progress=False)
    assert not np.allclose(w.w_spam, w1_flipped.w_spam)


def extract_ids(raw: bytes) -> np.ndarray:
    from classifier.features import extract

    return extract(raw, P)
