"""Metrics and reports: per-class P/R/F1, macro-F1, confusion matrix, spam P/R, speed.

Plain numpy so that `triaged evaluate` needs only the runtime dependencies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np

from classifier.corpus import Message
from classifier.model import LoadedModel
from classifier.types import Classification


class ClassStats(msgspec.Struct):
    precision: float
    recall: float
    f1: float
    support: int


class Report(msgspec.Struct):
    n: int
    n_category: int  # messages with a known category (spam and unlabelled excluded)
    labels: list[str]
    per_class: dict[str, ClassStats]
    macro_f1: float | None
    accuracy: float | None
    confusion: list[list[int]]  # rows: true label, columns: predicted
    n_spam: int
    spam_precision: float | None
    spam_recall: float | None
    spam_f1: float | None
    spam_fp_rate: float | None  # ham called spam / ham
    messages_per_s: float | None = None


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def compute_report(
    labels: Sequence[str],
    true_cat: Sequence[str | None],
    pred_cat: Sequence[str],
    true_spam: Sequence[bool],
    pred_spam: Sequence[bool],
) -> Report:
    """Category metrics over messages whose category is known; spam metrics over all.

    Macro-F1 averages the classes present in the truth (a class with no
    true message has no defined recall).
    """
    index = {c: i for i, c in enumerate(labels)}
    k = len(labels)
    conf = np.zeros((k, k), dtype=np.int64)
    for t, guess in zip(true_cat, pred_cat, strict=True):
        if t is not None and t in index and guess in index:
            conf[index[t], index[guess]] += 1
    per: dict[str, ClassStats] = {}
    f1s = []
    for label, i in index.items():
        tp = int(conf[i, i])
        fp = int(conf[:, i].sum()) - tp
        fn = int(conf[i, :].sum()) - tp
        p, r, f = _prf(tp, fp, fn)
        support = int(conf[i, :].sum())
        per[label] = ClassStats(round(p, 4), round(r, 4), round(f, 4), support)
        if support:
            f1s.append(f)
    n_cat = int(conf.sum())
    ts = np.asarray(true_spam, dtype=bool)
    ps = np.asarray(pred_spam, dtype=bool)
    tp = int((ts & ps).sum())
    fp = int((~ts & ps).sum())
    fn = int((ts & ~ps).sum())
    n_ham = int((~ts).sum())
    sp, sr, sf = _prf(tp, fp, fn)
    has_spam = bool(ts.any())
    return Report(
        n=len(true_spam),
        n_category=n_cat,
        labels=list(labels),
        per_class=per,
        macro_f1=round(float(np.mean(f1s)), 4) if f1s else None,
        accuracy=round(float(np.trace(conf)) / n_cat, 4) if n_cat else None,
        confusion=conf.tolist(),
        n_spam=int(ts.sum()),
        spam_precision=round(sp, 4) if has_spam or fp else None,
        spam_recall=round(sr, 4) if has_spam else None,
        spam_f1=round(sf, 4) if has_spam else None,
        spam_fp_rate=round(fp / n_ham, 4) if n_ham else None,
    )


def format_report(r: Report, title: str = "") -> str:
    def f(x: float | None) -> str:
        return "  n/a" if x is None else f"{x:.3f}"

    lines = [f"== {title} ({r.n} messages, {r.n_category} with a category, {r.n_spam} spam)"]
    if r.n_category:
        w = max(len(c) for c in r.labels) + 2
        lines.append(f"{'category':<{w}} precision  recall     f1  support")
        for c in r.labels:
            s = r.per_class[c]
            lines.append(
                f"{c:<{w}} {f(s.precision):>9} {f(s.recall):>7} {f(s.f1):>6} {s.support:>8}"
            )
        lines.append(f"macro-F1 {f(r.macro_f1)}   accuracy {f(r.accuracy)}")
        lines.append("confusion (rows: true, columns: predicted)")
        lines.append(" " * w + " ".join(f"{c[:10]:>10}" for c in r.labels))
        for c, row in zip(r.labels, r.confusion, strict=True):
            lines.append(f"{c:<{w}}" + " ".join(f"{v:>10}" for v in row))
    lines.append(
        f"spam: precision {f(r.spam_precision)} recall {f(r.spam_recall)} F1 {f(r.spam_f1)} "
        f"ham FP rate {f(r.spam_fp_rate)}"
    )
    if r.messages_per_s is not None:
        lines.append(f"speed: {r.messages_per_s:,.0f} messages/s (features + batched inference)")
    return "\n".join(lines)


# Messages featurised before length-sorting them into batches.
_SORT_BATCHES = 8


def predict_messages(
    model: LoadedModel, raws: Iterable[bytes], batch_size: int = 256
) -> tuple[list[str], list[float], list[bool], list[float], float]:
    """Categories, their scores, spam verdicts, spam scores and the seconds it took."""
    cats: list[str] = []
    scores: list[float] = []
    spams: list[bool] = []
    spam_scores: list[float] = []
    pending: list[bytes] = []
    elapsed = 0.0

    def flush() -> None:
        # Batches of similar length: a batch is padded to its longest message,
        # so mixing one 3,000-id message into 255 short ones multiplies the work.
        feats = model.featurize_many(pending)
        order = sorted(range(len(feats)), key=lambda i: feats[i].shape[0])
        out: list[Classification | None] = [None] * len(feats)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, c in zip(idx, model.predict([feats[i] for i in idx]), strict=True):
                out[i] = c
        for got in out:
            assert got is not None
            cats.append(got.category)
            scores.append(got.score)
            spams.append(bool(got.spam))
            spam_scores.append(got.spam_score or 0.0)
        pending.clear()

    for raw in raws:
        pending.append(raw)
        if len(pending) >= batch_size * _SORT_BATCHES:
            t = time.perf_counter()
            flush()
            elapsed += time.perf_counter() - t
    t = time.perf_counter()
    flush()
    elapsed += time.perf_counter() - t
    return cats, scores, spams, spam_scores, elapsed


def evaluate_messages(
    model: LoadedModel, messages: Sequence[Message], batch_size: int = 256
) -> Report:
    cats, _, spams, _, elapsed = predict_messages(model, (m.raw for m in messages), batch_size)
    report = compute_report(
        model.manifest.labels,
        [m.category for m in messages],
        cats,
        [m.spam for m in messages],
        spams,
    )
    report.messages_per_s = round(len(messages) / elapsed, 1) if elapsed > 0 else None
    return report


def expected_calibration_error(
    confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, bins: int = 15
) -> float | None:
    """ECE (Naeini et al. 2015; Guo et al. 2017): equal-width confidence bins,
    |accuracy - mean confidence| weighted by the share of messages in each bin.

    For the category head: confidence = the top probability, correct = the
    argmax is the true class. For the spam head: confidence = spam_prob,
    correct = the message is spam (the reliability of a binary score)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape[0] == 0:
        return None
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += float(m.sum()) * abs(float(ok[m].mean()) - float(conf[m].mean()))
    return round(total / float(conf.shape[0]), 4)


def report_dict(r: Report) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(r)
    return out


__all__ = [
    "Report",
    "compute_report",
    "evaluate_messages",
    "expected_calibration_error",
    "format_report",
    "predict_messages",
    "report_dict",
]
