"""Calibration pieces of the training recipe: temperature, Platt, the FP-bound threshold, ECE."""

from __future__ import annotations

import numpy as np

from classifier.evaluate import expected_calibration_error
from classifier.features import (
    MODERN_ONLY_TOKENS,
    FeatureParams,
    extract,
    structure_ids,
)
from classifier.train import (
    Weights,
    calibrated,
    fit_platt,
    fit_temperature,
    forward_logits,
    fp_threshold,
    sigmoid,
)

P = FeatureParams()


def test_platt_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000).astype(np.float32)
    y = rng.random(20000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))
    a, b = fit_platt(z, y)
    assert abs(a - 0.5) < 0.05 and abs(b + 1.0) < 0.1
    # Separable data does not diverge.
    a, b = fit_platt(np.array([-5, -4, 4, 5], np.float32), np.array([False, False, True, True]))
    assert np.isfinite(a) and np.isfinite(b) and a <= 4.0


def test_temperature_softens_overconfident_logits() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 5000)
    logits = rng.normal(0, 1, (5000, 3)).astype(np.float32)
    logits[np.arange(5000), y] += 1.0
    t = fit_temperature(logits * 4, y)  # four times too sharp
    assert 3.0 < t < 5.0


def test_ece_is_zero_when_calibrated_and_large_when_not() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(50000)
    ok = rng.random(50000) < p
    ece = expected_calibration_error(p, ok)
    assert ece is not None and ece < 0.01
    bad = expected_calibration_error(np.full(1000, 0.95), np.zeros(1000, bool))
    assert bad is not None and abs(bad - 0.95) < 1e-6
    assert expected_calibration_error([], []) is None


def test_fp_threshold_respects_every_bound() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.95, 0.6], np.float32)
    ham = np.array([True, True, True, False, False, True])
    t = fp_threshold(scores, [(ham, 0.0)], floor=0.05)
    assert 0.6 < t <= 0.9
    t = fp_threshold(scores, [(ham, 0.25)], floor=0.05)  # one of four may pass
    assert 0.3 < t <= 0.6


def test_calibration_folds_into_the_heads() -> None:
    rng = np.random.default_rng(3)
    d = 4
    w = Weights(
        emb=rng.normal(size=(P.buckets, d)).astype(np.float32), w_hid=None, b_hid=None,
        w_cat=rng.normal(size=(2 * d, 3)).astype(np.float32), b_cat=np.zeros(3, np.float32),
        w_spam=rng.normal(size=(2 * d, 1)).astype(np.float32), b_spam=np.ones(1, np.float32),
    )  # fmt: skip
    ids = [extract(b"From: a@b.example\nSubject: hi\n\nhello world\n", P)]
    logits, z = forward_logits(w, ids, P.struct_slots)
    logits2, z2 = forward_logits(calibrated(w, 2.0, (0.5, -1.0)), ids, P.struct_slots)
    np.testing.assert_allclose(logits2, logits / 2.0, rtol=1e-5)
    np.testing.assert_allclose(sigmoid(z2), sigmoid(0.5 * z - 1.0), rtol=1e-5)


def test_modern_only_tokens_are_what_extract_emits() -> None:
    raw = (
        b"From: Shop <news@shop.example>\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=mail.shop.example; s=s1; b=x\n"
        b"List-Unsubscribe: <https://shop.example/u?1>\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        b"Feedback-ID: 1:camp:esp\nSubject: offer\n\nbuy\n"
    )
    ids = set(extract(raw, P)[: P.struct_slots].tolist())
    era = dict(zip(MODERN_ONLY_TOKENS, structure_ids(MODERN_ONLY_TOKENS, P).tolist(), strict=True))
    assert era["sig:dkim"] in ids
    assert era["sig:one-click"] in ids and era["h+feedback-id"] in ids
    # Aligned or not, the same token: an unverified d= is the sender's claim.
    esp = raw.replace(b"d=mail.shop.example", b"d=esp-mailer.example")
    assert set(extract(esp, P)[: P.struct_slots].tolist()) == ids
    unsigned = raw.replace(b"DKIM-Signature: v=1; a=rsa-sha256; d=mail.shop.example; s=s1; b=x\n", b"")
    assert era["sig:dkim"] not in set(extract(unsigned, P)[: P.struct_slots].tolist())
    # An http (not https) target is no RFC 8058 one-click unsubscribe.
    http = raw.replace(b"<https://", b"<http://")
    assert era["sig:one-click"] not in set(extract(http, P)[: P.struct_slots].tolist())
