"""The default model's recipe: data, splits, training, calibration, held-out evaluation.

  python models/default_recipe.py build   # models/default.onnx, default-int8.onnx, default-metrics.json, MODEL_CARD.md
  python models/default_recipe.py eval    # held-out report + one JSON line (make eval)
  python models/default_recipe.py replay  # models/default.replay.npz only (build writes it too)

Headline: leave-one-source-out (LOSO). The model meets mail from senders and
sources it has never seen, so it is scored that way: for each source, a model
trained by this same recipe without it predicts it.
- Each SpamAssassin group (easy-ham-1, easy-ham-2, hard-ham-1, spam-1,
  spam-2) is held out whole: 5 trainings.
- The modern sets and Enron are held out by sender: their groups (the list for
  list mail, the From organisation for the other modern sets, the sender
  address for Enron, whose mail is all one domain and the only person-to-person
  set) go to 3 folds by a hash of the group; each fold trains on everything
  but its groups: 3 trainings. Every modern message is so predicted by a model
  that never saw its sender or list.
The spam false-positive rate on modern legitimate mail is measured on those
out-of-fold predictions only. Secondary lines: the random split (20% of
SpamAssassin + Enron by a hash of the bytes, never trained on by the shipped
model) and phishing-pot (CC BY-NC: evaluation only, never trained on).

The recipe (the same in every fold and for the shipped model): 15% of the
training messages (by hash; by sender group for modern non-list mail) are a
calibration slice the weights never see. On it: a temperature for the category
head and Platt scaling for the spam head, both folded into the head weights.
The spam threshold is chosen on out-of-fold scores of held-out senders
(`oof_threshold`: at most MAX_FP_MODERN of modern legitimate mail and
MAX_FP_SOURCE of each modern source above it); in LOSO each fold gets the
threshold the other folds' scores give (cross-fitting), the shipped model the
one all of them give.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from classifier.corpus import Message
from classifier.evaluate import (
    Report,
    compute_report,
    evaluate_messages,
    expected_calibration_error,
    format_report,
    predict_messages,
    report_dict,
)
from classifier.features import (
    MODERN_ONLY_TOKENS,
    FeatureParams,
    IdArray,
    extract,
    structure_ids,
)
from classifier.labels import (
    CATEGORIES,
    MODERN_SETS,
    format_audit,
    load_enron,
    load_modern,
    load_spamassassin,
)
from classifier.model import load_model
from classifier.train import (
    TrainConfig,
    TrainResult,
    calibrated,
    export,
    featurize,
    fit,
    fit_platt,
    fit_temperature,
    forward_logits,
    fp_threshold,
    make_manifest,
    sigmoid,
    softmax,
    split_by_hash,
)

ROOT = Path(__file__).resolve().parent.parent
SA_DIR = ROOT / "data-cache/spamassassin/package/data"
# The shared data folder beside the checkout (/work/main -> /work/shared), or
# two levels up for a worktree under /work/wt/NAME.
SHARED = next(
    (p.resolve() for p in (ROOT / "../shared/data", ROOT / "../../shared/data") if p.is_dir()),
    (ROOT / "../shared/data").resolve(),
)
UNPACKED = ROOT / "data-cache/shared"
MODEL = ROOT / "models/default.onnx"
METRICS = ROOT / "models/default-metrics.json"
CARD = ROOT / "models/MODEL_CARD.md"
CARD_TEMPLATE = Path(__file__).with_name("model_card.tmpl.md")
REPLAY = ROOT / "models/default.replay.npz"  # the replay sample `triaged learn` rehearses
NAME, VERSION = "triaged-default", "2"
# Balanced class weights (power 1.0): list mail outnumbers person-to-person
# mail 4 to 1 in the corpora, and with 1/sqrt weights a short personal note
# with nothing list-like in it still fell to `forums` by prior.
# text_bag_dropout stays 0: on the 3 sender folds (development runs) 0.3
# raised phishing-pot recall at the FP-bound threshold from 0.58 to 0.67 and
# shop notices held out by sender from 41% to 64% `updates`, but with the words
# muted a bare personal note ("lunch?" with From, To and Subject only) fell to
# `updates` by its sparse headers, and one build called a family note spam.
CFG = TrainConfig(token_dropout=0.5, hidden=64, class_weight_power=0.75, text_bag_dropout=0.0)
# LOSO trains 8 models on the shared 2-core machine: fewer epochs per fold
# (the weight averaging over the last half of the epochs still applies).
FOLD_CFG = msgspec.structs.replace(CFG, epochs=6)
# Modern training mail is seen 3 times per epoch: it is scarce (2,300 vs 7,700
# messages from 1999-2002) and it is what the model meets in production.
MODERN_REPEAT = 3
# The shipped model's feature params. struct_digits (and lure_signs) are the
# trials of December 2026 (model card, "Tried for modern spam recall"):
# phishing-pot recall 0.51 -> 0.60-0.62, short of 0.90, and the sanity set's
# categories moved; off until a build meets the targets with them.
PARAMS = FeatureParams()
CAL_FRACTION = 0.15
MAX_FP_MODERN = 0.008  # pooled modern legitimate mail, out of fold (target: <= 0.01 held out)
MAX_FP_SOURCE = 0.05
# Person-to-person mail (primary, of any era: Enron is the only large set) is
# the mail a user can least afford to lose: its own, tighter bound.
MAX_FP_PERSONAL = 0.005
# Old ham (1999-2002, SpamAssassin + Enron) only bounds the threshold loosely:
# the 2002 newsletters of hard-ham-1 score as spam when held out (their
# vocabulary is 2002 spam's), and the bound is about today's mail.
MAX_FP_CLASSIC = 0.05
GROUP_FOLDS = 3
# A source's macro-F1 averages the classes with at least this many messages in
# it: the F1 of a class with 2 messages in a source (2 forwarded shipping
# notices, 9 SpamAssassin replies) is 0 or 1 by chance and would move that
# source's figure by half. Those classes still count in the pooled report and
# in the per-class rows; `macro_f1_all_classes` is the figure without the rule.
MIN_CLASS_SUPPORT = 20
ERA_BALANCE = True  # era_balance_spam()
# Weight of modern spam in the spam loss alone (on top of era_balance_spam's
# copies). Above 1 it pays only with a spam tower (TrainConfig.spam_hidden):
# through the shared hidden layer, 3x cost 3-6 points of LOSO macro-F1.
MODERN_SPAM_WEIGHT = 1.0
# unredacted(): off. Alone on this recipe (full build, 2026-12-01): phishing-pot
# recall 0.509 -> 0.560, but LOSO macro-F1 0.916 -> 0.873 (easy-ham-1's RSS
# items, held out, went to `promotions`: they flip between builds) and held-out
# modern ham FP 0.0009 -> 0.0032. Not shipped; the artifact is real, though.
UNREDACT = False
# A From field the corpus donor scrubbed (see unredacted()).
REDACTED_FROM = re.compile(rb"(?mi)^from:[ \t]*\[removed\][ \t]*\r?$")
# The two public lists go to different folds (the list is the group).
LIST_FOLD = {"open-iscsi.googlegroups.com.0.mbox": 0, "linux-oxnas.groups.io.0.mbox": 1}
SA_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def _unpack() -> None:
    import tarfile

    tarballs = sorted(SHARED.glob("*.tar.gz"))
    if not tarballs:  # say so here, not as an empty corpus three steps later
        raise SystemExit(f"no *.tar.gz in {SHARED}: the shared data must sit beside the repo")
    UNPACKED.mkdir(parents=True, exist_ok=True)
    for tgz in tarballs:
        marker = UNPACKED / (tgz.name + ".done")
        if not marker.exists():
            with tarfile.open(tgz) as tf:
                tf.extractall(UNPACKED, filter="data")
            marker.touch()


def _hash_unit(key: str, salt: bytes) -> float:
    return int.from_bytes(hashlib.sha256(salt + key.encode()).digest()[:4], "big") / 2**32


def is_modern(m: Message) -> bool:
    return m.source.startswith("modern/")


def by_sender(m: Message) -> bool:
    """Held out by sender group in LOSO (the modern sets and Enron)."""
    return is_modern(m) or m.source == "enron"


def group_fold(m: Message) -> int:
    if m.group in LIST_FOLD:
        return LIST_FOLD[m.group]
    return int(_hash_unit(m.group, b"loso") * GROUP_FOLDS)


def in_calibration(m: Message) -> bool:
    """The recipe's calibration slice: by sender group for modern non-list
    mail (templates repeat within a sender), by message elsewhere."""
    if is_modern(m) and m.source != "modern/forums":
        return _hash_unit(m.group, b"cal") < CAL_FRACTION
    return split_by_hash(m, CAL_FRACTION, b"cal")


class Data(msgspec.Struct):
    trainable: list[Message]  # SpamAssassin + Enron + modern sets that may be trained on
    phishing: list[Message]  # evaluation only
    random_test: list[Message]  # 20% of SpamAssassin + Enron by hash (the shipped model never sees it)
    feats: dict[str, IdArray]  # ident -> ids, computed once for every fold
    audit: str


def load_all(progress: bool = True) -> Data:
    _unpack()
    sa, audit = load_spamassassin(SA_DIR, SHARED / "spamassassin-weak-labels.json.gz")
    enron, audit_e = load_enron(UNPACKED / "enron_with_categories")
    audit.update(audit_e)
    modern = load_modern(UNPACKED)
    trainable_src = {src for (_c, _s, src, ok) in MODERN_SETS.values() if ok}
    trainable = sa + enron + [m for m in modern if m.source in trainable_src]
    phishing = [m for m in modern if m.source not in trainable_src]
    random_test = [m for m in sa + enron if split_by_hash(m, 0.2, b"test")]
    everything = trainable + phishing
    ids = featurize(everything, PARAMS, progress=progress)
    feats = {m.ident: a for m, a in zip(everything, ids, strict=True)}
    return Data(trainable, phishing, random_test, feats, format_audit(audit))


class Fitted(msgspec.Struct):
    result: TrainResult  # calibrated weights, threshold, summary
    temperature: float
    platt: tuple[float, float]


def recipe(train: Sequence[Message], data: Data, cfg: TrainConfig, progress: bool) -> Fitted:
    """Fit on `train` minus its calibration slice, calibrate and pick the threshold on the slice."""
    cal = [m for m in train if in_calibration(m)]
    fit_on = [m for m in train if not in_calibration(m)]
    fit_on = fit_on + [m for m in fit_on if is_modern(m)] * (MODERN_REPEAT - 1)
    fit_on = fit_on + era_balance_spam(fit_on)
    index = {c: i for i, c in enumerate(CATEGORIES)}

    def targets(ms: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
        cat = np.array([index[m.category] if m.category else -1 for m in ms], dtype=np.int64)
        return cat, np.array([m.spam for m in ms], dtype=bool)

    cat, spam = targets(fit_on)
    xs = [data.feats[m.ident] for m in fit_on]
    x = era_augment(fit_on, unredacted(xs, fit_on) if UNREDACT else xs, cfg.seed)
    modern_spam = np.array([is_modern(m) and m.spam for m in fit_on], dtype=bool)
    w = fit(
        x, cat, spam.astype(np.float32), len(CATEGORIES),
        PARAMS, cfg, progress=progress,
        spam_weight=np.where(modern_spam, MODERN_SPAM_WEIGHT, 1.0).astype(np.float32),
    )  # fmt: skip
    logits, z = forward_logits(w, [data.feats[m.ident] for m in cal], PARAMS.struct_slots)
    ccat, cspam = targets(cal)
    known = ccat >= 0
    temperature = fit_temperature(logits[known], ccat[known])
    platt = fit_platt(z, cspam)
    s = sigmoid(platt[0] * z + platt[1])
    modern = np.array([is_modern(m) for m in cal], dtype=bool)
    source = np.array([m.source for m in cal])
    # The bound holds for each modern source of legitimate mail on its own:
    # pooled, 1,500 list posts would let the few newsletters and shop notices
    # (the wanted bulk mail most like spam) all score above the threshold.
    bounds = [
        (modern & ~cspam & (source == src), MAX_FP_MODERN)
        for src in sorted(set(source[modern & ~cspam]))
    ]
    # Reported only (the calibration-slice report): the threshold that ships
    # comes from held-out senders (oof_threshold), the slice is too small.
    threshold = fp_threshold(s, [*bounds, (~modern & ~cspam, MAX_FP_CLASSIC)], floor=0.02)
    pred = softmax(logits[known] / temperature).argmax(axis=1)
    validation = compute_report(
        CATEGORIES, [CATEGORIES[i] for i in ccat[known]], [CATEGORIES[i] for i in pred],
        list(cspam[known]), list(s[known] >= threshold),
    )  # fmt: skip
    summary = {
        "messages": len(fit_on),
        "categories": dict(sorted(Counter(m.category for m in fit_on if m.category).items())),
        "spam": int(sum(m.spam for m in fit_on)),
        "ham_without_category": sum(1 for m in fit_on if m.category is None and not m.spam),
        "sources": dict(sorted(Counter(m.source for m in fit_on).items())),
        "calibration_messages": len(cal),
        "temperature": temperature,
        "platt": list(platt),
        "config": msgspec.to_builtins(cfg),
    }
    result = TrainResult(calibrated(w, temperature, platt), CATEGORIES, threshold, validation, summary)
    return Fitted(result, temperature, platt)


def _redaction_ids() -> frozenset[int]:
    """The ids a donor's "From: [removed]" gives a message (the glitchyzorua set
    scrubbed every sender): its name, and the tokens of an empty sender domain."""
    body = b"Subject: s\n\nhello\n"
    probe = set(extract(b"From:[removed]\n" + body, PARAMS).tolist())
    bare = set(extract(body, PARAMS).tolist())
    # The tokens of an empty sender domain come with both; they are the scrub too.
    empty = structure_ids(["from-tld:", "from-labels:0", "from-no-name"], PARAMS).tolist()
    return frozenset(((probe ^ bare) | set(empty)) - {0})


def unredacted(xs: list[IdArray], ms: Sequence[Message]) -> list[IdArray]:
    """`xs` with the sender ids of messages whose From the corpus donor removed
    dropped: every glitchyzorua spam says "From: [removed]" and no ham does, so
    the spam head can learn "no sender domain = spam" (how the set was scrubbed)
    instead of what the mail says. Those messages keep their subject, body and
    the rest of their structure; what they say of a sender is nothing."""
    redacted = np.array(sorted(_redaction_ids()), dtype=np.int64)
    out = list(xs)
    for i, m in enumerate(ms):
        if not REDACTED_FROM.search(m.raw[:65536]):
            continue
        a, slots = xs[i], PARAMS.struct_slots
        struct = a[:slots].copy()
        struct[np.isin(struct, redacted)] = 0
        text = a[slots:]
        out[i] = np.concatenate([struct, text[~np.isin(text, redacted)]])
    return out


def era_balance_spam(ms: Sequence[Message]) -> list[Message]:
    """Extra copies of modern spam so that spam is as common among modern
    training mail as among 1999-2002 mail (the whole extra, to add).

    Modern mail is 9 parts ham to 1 part spam here, old mail 3 to 1: left so,
    the spam head learns that anything that looks modern (HTML layouts, today's
    words, ESP structure) is ham, which is the era of the data again, not spam."""
    if not ERA_BALANCE:
        return []
    old = [m for m in ms if not is_modern(m)]
    modern = [m for m in ms if is_modern(m)]
    old_rate = sum(m.spam for m in old) / max(len(old), 1)
    spam = [m for m in modern if m.spam]
    ham = len(modern) - len(spam)
    if not spam or old_rate <= 0:
        return []
    want = old_rate / (1 - old_rate) * ham  # spam copies for the old ratio
    extra = round(want / len(spam)) - 1
    return spam * max(extra, 0)


def era_augment(ms: Sequence[Message], xs: list[IdArray], seed: int) -> list[IdArray]:
    """Give 1999-2002 messages the DKIM-era tokens (features.MODERN_ONLY_TOKENS:
    DKIM alignment, one-click unsubscribe, Feedback-ID) at the rate the modern
    training mail of the same spam label carries them.

    Without this, every such token appears only in modern mail, most of which
    is ham, and the spam head learns "signed = ham" from the era of the data
    (the v1 model card's finding). With it, a token is as common in old spam as
    in modern spam and in old ham as in modern ham: what is left for the model
    to learn from it is the difference between modern spam and modern ham."""
    slots = PARAMS.struct_slots
    era = structure_ids(MODERN_ONLY_TOKENS, PARAMS)
    modern = [i for i, m in enumerate(ms) if is_modern(m)]
    rates: dict[bool, np.ndarray] = {}
    for label in (False, True):
        idx = [i for i in modern if ms[i].spam == label]
        rates[label] = (
            np.array([np.mean([t in xs[i][:slots] for i in idx]) for t in era])
            if idx else np.zeros(len(era))
        )  # fmt: skip
    rng = np.random.default_rng(seed)
    out = list(xs)
    for i, m in enumerate(ms):
        if is_modern(m):
            continue
        add = era[rng.random(len(era)) < rates[m.spam]]
        if add.size:
            a = xs[i].copy()
            free = np.flatnonzero(a[:slots] == 0)[: add.size]
            a[free] = add[: free.size]
            out[i] = a
    return out


# --- leave-one-source-out -------------------------------------------------------------


class Oof(msgspec.Struct):
    """Out-of-fold predictions: every trainable message, by a model that never saw its source."""

    messages: list[Message]
    probs: np.ndarray  # [N, C] calibrated
    spam_score: np.ndarray  # [N]
    spam_pred: np.ndarray  # [N] at the fold model's own threshold
    folds: list[dict[str, Any]]
    fold_of: np.ndarray  # [N] index into folds
    phishing_scores: list[np.ndarray]  # each fold model's spam scores on phishing-pot
    threshold: float  # chosen on all out-of-fold scores: the shipped model's


def loso(data: Data, progress: bool = True) -> Oof:
    folds: list[tuple[str, list[Message], list[Message]]] = []
    for g in SA_GROUPS:
        src = f"sa/{g}"
        folds.append((src, [m for m in data.trainable if m.source != src],
                      [m for m in data.trainable if m.source == src]))  # fmt: skip
    for k in range(GROUP_FOLDS):
        test = [m for m in data.trainable if by_sender(m) and group_fold(m) == k]
        held = {id(m) for m in test}
        folds.append((f"senders-{k}", [m for m in data.trainable if id(m) not in held], test))
    msgs: list[Message] = []
    probs, scores, preds, fold_of, phish = [], [], [], [], []
    info = []
    for name, train, test in folds:
        t0 = time.time()
        fitted = recipe(train, data, FOLD_CFG, progress=False)
        w = fitted.result.weights
        logits, z = forward_logits(w, [data.feats[m.ident] for m in test], PARAMS.struct_slots)
        s = sigmoid(z)
        _, zp = forward_logits(w, [data.feats[m.ident] for m in data.phishing], PARAMS.struct_slots)
        msgs += test
        probs.append(softmax(logits))
        scores.append(s)
        fold_of.append(np.full(len(test), len(info)))
        phish.append(sigmoid(zp))
        info.append({
            "fold": name, "train": len(train), "test": len(test),
            "temperature": fitted.temperature, "platt": list(fitted.platt),
            "seconds": round(time.time() - t0, 1),
        })  # fmt: skip
        if progress:
            print(f"loso fold {name}: {info[-1]}", file=sys.stderr, flush=True)
    all_scores, where = np.concatenate(scores), np.concatenate(fold_of)
    # Each fold's threshold comes from the other folds' out-of-fold scores
    # (cross-fitting): the messages a fold is scored on never chose its threshold.
    preds = np.zeros(len(msgs), dtype=bool)
    for i, fold in enumerate(info):
        t = oof_threshold(msgs, all_scores, where != i)
        preds[where == i] = all_scores[where == i] >= t
        fold["threshold"] = t
        fold["phishing_recall"] = round(float((phish[i] >= t).mean()), 4)
    shipped = oof_threshold(msgs, all_scores, np.ones(len(msgs), dtype=bool))
    return Oof(
        msgs, np.concatenate(probs), all_scores, preds, info, where, phish, shipped,
    )  # fmt: skip


def oof_threshold(msgs: Sequence[Message], scores: np.ndarray, mask: np.ndarray) -> float:
    """The spam threshold from out-of-fold (calibrated) scores: the lowest at
    which at most MAX_FP_MODERN of the modern legitimate mail, at most
    MAX_FP_SOURCE of each modern source's legitimate mail (so 1,500 list posts
    cannot hide the few newsletters and shop notices, the wanted mail most
    like spam), at most MAX_FP_PERSONAL of person-to-person mail and at most
    MAX_FP_CLASSIC of the old ham score at or above it."""
    ham = np.array([not m.spam for m in msgs]) & mask
    modern = np.array([is_modern(m) for m in msgs])
    source = np.array([m.source for m in msgs])
    personal = np.array([m.category == "primary" for m in msgs])
    bounds = [
        (ham & modern, MAX_FP_MODERN),
        (ham & ~modern, MAX_FP_CLASSIC),
        (ham & personal, MAX_FP_PERSONAL),
    ]
    bounds += [(ham & (source == src), MAX_FP_SOURCE) for src in sorted(set(source[ham & modern]))]
    return fp_threshold(scores, bounds, floor=0.02)


def _report(oof: Oof, mask: np.ndarray) -> Report:
    idx = np.flatnonzero(mask)
    return compute_report(
        CATEGORIES,
        [oof.messages[i].category for i in idx],
        [CATEGORIES[j] for j in oof.probs[idx].argmax(axis=1)],
        [oof.messages[i].spam for i in idx],
        list(oof.spam_pred[idx]),
    )


class LosoSummary(msgspec.Struct):
    per_source: dict[str, dict[str, Any]]
    macro_f1_mean: float
    macro_f1_worst: float
    worst_source: str
    macro_f1_mean_all_classes: float  # without the MIN_CLASS_SUPPORT rule
    modern_ham_fp_rate: float
    modern_ham_n: int
    modern_bulk_fp_rate: float  # the same, without the person-to-person forwards
    spam_ece: float | None
    category_ece: float | None
    pooled: Report
    modern_ham: Report
    source_split: Report  # hard-ham-1 + spam-2 (the old "source split", now out-of-fold)
    phishing_recall_folds: list[float]


def summarise(oof: Oof) -> LosoSummary:
    sources = sorted({m.source for m in oof.messages})
    src = np.array([m.source for m in oof.messages])
    per: dict[str, dict[str, Any]] = {}
    for s in sources:
        r = _report(oof, src == s)
        big = [v.f1 for v in r.per_class.values() if v.support >= MIN_CLASS_SUPPORT]
        per[s] = {
            "held_out": "by sender (3 folds)" if s == "enron" or s.startswith("modern/") else "whole source",
            "n": r.n, "n_category": r.n_category,
            "macro_f1": round(float(np.mean(big)), 4) if big else None,
            "macro_f1_all_classes": r.macro_f1, "accuracy": r.accuracy,
            "spam_fp_rate": r.spam_fp_rate, "spam_recall": r.spam_recall,
            "classes": {c: msgspec.to_builtins(v) for c, v in r.per_class.items() if v.support},
            "confusion": r.confusion,
        }  # fmt: skip
    scored = {s: v["macro_f1"] for s, v in per.items() if v["macro_f1"] is not None}
    worst = min(scored, key=lambda s: scored[s])
    every = [v["macro_f1_all_classes"] for v in per.values() if v["macro_f1_all_classes"] is not None]
    modern_ham = np.array([is_modern(m) and not m.spam for m in oof.messages])
    bulk = modern_ham & np.array([m.category != "primary" for m in oof.messages])
    mh = _report(oof, modern_ham)
    known = np.array([m.category is not None for m in oof.messages])
    truth = np.array([CATEGORIES.index(m.category) if m.category else -1 for m in oof.messages])
    top = oof.probs.argmax(axis=1)
    return LosoSummary(
        per_source=per,
        macro_f1_mean=round(float(np.mean(list(scored.values()))), 4),
        macro_f1_worst=scored[worst],
        worst_source=worst,
        macro_f1_mean_all_classes=round(float(np.mean(every)), 4),
        modern_ham_fp_rate=mh.spam_fp_rate or 0.0,
        modern_ham_n=mh.n,
        modern_bulk_fp_rate=round(float(oof.spam_pred[bulk].mean()), 4),
        spam_ece=expected_calibration_error(oof.spam_score, [m.spam for m in oof.messages]),
        category_ece=expected_calibration_error(
            oof.probs[known].max(axis=1), top[known] == truth[known]
        ),
        pooled=_report(oof, np.ones(len(oof.messages), dtype=bool)),
        modern_ham=mh,
        source_split=_report(oof, np.isin(src, ["sa/hard-ham-1", "sa/spam-2"])),
        phishing_recall_folds=[f["phishing_recall"] for f in oof.folds],
    )


# --- the shipped model -------------------------------------------------------------------


def replay_sample(train: Sequence[Message], data: Data, origin: str) -> Any:
    """The replay sample shipped beside a model trained on `train` (feature ids
    only: classifier/learning/replay.py says why), stratified by source, category, spam."""
    from classifier.learning.replay import build_sample

    return build_sample(
        [data.feats[m.ident] for m in train], [m.category for m in train],
        [m.spam for m in train], [m.source for m in train], PARAMS, CATEGORIES, origin=origin,
    )  # fmt: skip


def write_replay(data: Data) -> None:
    from classifier.learning.replay import save

    train = shipped_training_set(data)
    save(replay_sample(train, data, f"{NAME}/{VERSION} training set"), REPLAY)
    print(f"wrote {REPLAY.relative_to(ROOT)} ({REPLAY.stat().st_size:,} bytes)")


def shipped_training_set(data: Data) -> list[Message]:
    test = {id(m) for m in data.random_test}
    return [m for m in data.trainable if id(m) not in test]


def _shipped_reports(model_path: Path, data: Data) -> tuple[dict[str, Report], dict[str, Any]]:
    model = load_model(str(model_path))
    reports = {
        "random_held_out": evaluate_messages(model, data.random_test),
        "modern_phishing_pot": evaluate_messages(model, data.phishing),
    }
    # Calibration of the shipped model on the random split (in-distribution).
    cats, scores, _, spam_scores, _ = predict_messages(model, (m.raw for m in data.random_test))
    known = [i for i, m in enumerate(data.random_test) if m.category]
    extra = {
        "random_spam_ece": expected_calibration_error(spam_scores, [m.spam for m in data.random_test]),
        "random_category_ece": expected_calibration_error(
            [scores[i] for i in known], [cats[i] == data.random_test[i].category for i in known]
        ),
    }
    return reports, extra


def summary_line(reports: dict[str, Report], s: LosoSummary) -> dict[str, Any]:
    r, ph = reports["random_held_out"], reports["modern_phishing_pot"]
    return {
        "loso_macro_f1_mean": s.macro_f1_mean,
        "loso_macro_f1_worst": s.macro_f1_worst,
        "loso_worst_source": s.worst_source,
        "loso_macro_f1_mean_all_classes": s.macro_f1_mean_all_classes,
        "loso_pooled_macro_f1": s.pooled.macro_f1,
        "heldout_modern_ham_spam_fp_rate": s.modern_ham_fp_rate,
        "heldout_modern_ham_n": s.modern_ham_n,
        "modern_spam_recall": ph.spam_recall,
        "spam_ece": s.spam_ece,
        "category_ece": s.category_ece,
        "macro_f1": r.macro_f1,
        "spam_f1": r.spam_f1,
        "source_split_macro_f1": s.source_split.macro_f1,
        "source_split_spam_f1": s.source_split.spam_f1,
        "modern_ham_fp_rate": s.modern_ham_fp_rate,
        "n": r.n + ph.n + s.pooled.n,
    }


def _loso_table(s: LosoSummary) -> str:
    rows = [
        "| held-out source | held out | messages | with category | macro-F1 | macro-F1, all classes | accuracy | spam FP rate (ham) | spam recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in s.per_source.items():
        rows.append(
            f"| {name} | {v['held_out']} | {v['n']:,} | {v['n_category']:,} | {_f(v['macro_f1'])} "
            f"| {_f(v['macro_f1_all_classes'])} "
            f"| {_f(v['accuracy'])} | {_f(v['spam_fp_rate'])} | {_f(v['spam_recall'])} |"
        )
    return "\n".join(rows)


def _per_class_rows(s: LosoSummary) -> str:
    rows = ["| held-out source | class | precision | recall | F1 | support |", "|---|---|---|---|---|---|"]
    for name, v in s.per_source.items():
        for c, st in v["classes"].items():
            rows.append(f"| {name} | {c} | {st['precision']:.3f} | {st['recall']:.3f} | {st['f1']:.3f} | {st['support']} |")
    return "\n".join(rows)


def print_loso(s: LosoSummary, oof: Oof) -> None:
    print("== leave-one-source-out (headline): each source predicted by a model trained without it")
    print(_loso_table(s))
    print(f"macro-F1 mean {s.macro_f1_mean:.3f}, worst {s.macro_f1_worst:.3f} ({s.worst_source}); "
          f"all classes: mean {s.macro_f1_mean_all_classes:.3f}; pooled {_f(s.pooled.macro_f1)}")  # fmt: skip
    print(
        f"modern legitimate mail, held out by sender: spam FP rate {s.modern_ham_fp_rate:.4f} "
        f"(n={s.modern_ham_n}; bulk only {s.modern_bulk_fp_rate:.4f})"
    )
    print(f"calibration (out of fold): spam ECE {_f(s.spam_ece)}, category ECE {_f(s.category_ece)}")
    print(f"phishing-pot recall of each fold model: {s.phishing_recall_folds}")
    print(format_report(s.pooled, "LOSO pooled (all out-of-fold predictions)"))
    print(format_report(s.modern_ham, "LOSO modern legitimate mail"))


def build() -> int:
    t0 = time.time()
    data = load_all()
    train = shipped_training_set(data)
    print(f"shipped model: {len(train)} messages, {dict(Counter(m.source for m in train))}", flush=True)
    fitted = recipe(train, data, CFG, progress=True)
    oof = loso(data)
    s = summarise(oof)
    fitted.result.threshold = oof.threshold  # chosen on held-out senders, not the slice
    manifest = make_manifest(fitted.result, PARAMS, NAME, VERSION)
    export(fitted.result, manifest, MODEL)
    reports, extra = _shipped_reports(MODEL, data)
    metrics: dict[str, Any] = {k: report_dict(v) for k, v in reports.items()}
    metrics["loso"] = _loso_dict(s)
    metrics["calibration_slice"] = report_dict(fitted.result.validation) if fitted.result.validation else None
    metrics.update(extra)
    manifest = make_manifest(fitted.result, PARAMS, NAME, VERSION, metrics)
    paths = export(fitted.result, manifest, MODEL)  # again, with the held-out metrics inside
    write_replay(data)
    int8_reports, _ = _shipped_reports(paths[1], data)
    line = summary_line(reports, s)
    METRICS.write_text(
        json.dumps(
            {"summary": line, "fp32": metrics, "int8": {k: report_dict(v) for k, v in int8_reports.items()},
             "loso_folds": oof.folds, "audit": data.audit, "training": fitted.result.summary,
             "spam_threshold": fitted.result.threshold, "seconds": round(time.time() - t0, 1)},
            indent=1,
        )
    )  # fmt: skip
    CARD.write_text(model_card(reports, int8_reports, s, oof, fitted, data, extra, time.time() - t0))
    print_loso(s, oof)
    for k, rep in reports.items():
        print(format_report(rep, k))
    print(json.dumps(line))
    print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in paths)} in {time.time() - t0:.0f} s")
    return 0


def _loso_dict(s: LosoSummary) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(s)
    return out


def evaluate(model_path: Path) -> int:
    data = load_all()
    oof = loso(data)
    s = summarise(oof)
    print_loso(s, oof)
    reports, extra = _shipped_reports(model_path, data)
    print("== secondary: the shipped model on the random split and on phishing-pot")
    for k, v in reports.items():
        print(format_report(v, k))
    print(f"shipped model on the random split: spam ECE {_f(extra['random_spam_ece'])}, "
          f"category ECE {_f(extra['random_category_ece'])}")  # fmt: skip
    print(json.dumps(summary_line(reports, s)))
    return 0


def _confusion_md(r: Report) -> str:
    rows = ["| true \\ predicted | " + " | ".join(r.labels) + " |", "|---" * (len(r.labels) + 1) + "|"]
    for label, row in zip(r.labels, r.confusion, strict=True):
        if sum(row):
            rows.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(rows)


def _classes_md(r: Report) -> str:
    rows = ["| category | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label in r.labels:
        c = r.per_class[label]
        if c.support:
            rows.append(f"| {label} | {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} | {c.support} |")
    return "\n".join(rows)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def model_card(
    reports: dict[str, Report],
    int8: dict[str, Report],
    s: LosoSummary,
    oof: Oof,
    fitted: Fitted,
    data: Data,
    extra: dict[str, Any],
    seconds: float,
) -> str:
    r, ph = reports["random_held_out"], reports["modern_phishing_pot"]
    ri, phi = int8["random_held_out"], int8["modern_phishing_pot"]
    f = _f
    sizes = defaultdict(int)
    for m in data.trainable:
        sizes[m.source] += 1
    folds_md = "\n".join(
        f"| {x['fold']} | {x['train']:,} | {x['test']:,} | {x['threshold']} | {x['temperature']} "
        f"| {x['platt'][0]:.3f}, {x['platt'][1]:.3f} | {x['phishing_recall']:.3f} |"
        for x in oof.folds
    )
    nums = {
        "loso_mean": f(s.macro_f1_mean), "loso_worst": f(s.macro_f1_worst), "worst_source": s.worst_source,
        "modern_fp": f"{s.modern_ham_fp_rate:.4f}", "modern_n": f"{s.modern_ham_n:,}",
        "bulk_fp": f"{s.modern_bulk_fp_rate:.4f}", "spam_ece": f(s.spam_ece), "cat_ece": f(s.category_ece),
        "macro": f(r.macro_f1), "spam_f1": f(r.spam_f1), "spam_p": f(r.spam_precision),
        "spam_r": f(r.spam_recall), "classic_fp": f(r.spam_fp_rate), "phish_r": f(ph.spam_recall),
        "macro8": f(ri.macro_f1), "spam_f18": f(ri.spam_f1), "phish_r8": f(phi.spam_recall),
        "src_macro": f(s.source_split.macro_f1), "src_spam_f1": f(s.source_split.spam_f1),
        "rand_spam_ece": f(extra["random_spam_ece"]), "rand_cat_ece": f(extra["random_category_ece"]),
        "speed": f"{r.messages_per_s:,.0f}" if r.messages_per_s else "n/a",
        "speed8": f"{ri.messages_per_s:,.0f}" if ri.messages_per_s else "n/a",
        "size": MODEL.stat().st_size / 1e6, "size8": MODEL.with_name("default-int8.onnx").stat().st_size / 1e6,
        "threshold": fitted.result.threshold, "temperature": fitted.temperature,
        "platt_a": fitted.platt[0], "platt_b": fitted.platt[1],
        "phish_folds": ", ".join(f"{x:.3f}" for x in s.phishing_recall_folds),
        "folds_md": folds_md, "loso_table": _loso_table(s), "loso_classes": _per_class_rows(s),
        "conf_pooled": _confusion_md(s.pooled), "classes_r": _classes_md(r), "conf_r": _confusion_md(r),
        "conf_mh": _confusion_md(s.modern_ham), "classes_mh": _classes_md(s.modern_ham),
        "sizes": ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())),
        "n_phish": f"{len(data.phishing):,}", "n_random": f"{len(data.random_test):,}",
        "audit": data.audit, "training": json.dumps(fitted.result.summary, indent=1),
        "seconds": seconds, "fold_epochs": FOLD_CFG.epochs,
    }  # fmt: skip
    return CARD_TEMPLATE.read_text().format(
        **nums, cfg=CFG, params=PARAMS, name=NAME, version=VERSION, repeat=MODERN_REPEAT,
        cal=CAL_FRACTION, max_fp_modern=MAX_FP_MODERN, max_fp_classic=MAX_FP_CLASSIC,
        max_fp_source=MAX_FP_SOURCE, max_fp_personal=MAX_FP_PERSONAL,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("action", choices=["build", "eval", "unpack", "replay"])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--features", default="{}", help="FeatureParams fields to change (JSON)")
    args = ap.parse_args()
    np.seterr(all="ignore")
    global PARAMS
    PARAMS = msgspec.structs.replace(PARAMS, **json.loads(args.features))
    if args.action == "unpack":  # make test: tests read the modern sets too
        _unpack()
        return 0
    if args.action == "replay":  # only the replay sample, for the model as it is
        write_replay(load_all())
        return 0
    return build() if args.action == "build" else evaluate(Path(args.model))


if __name__ == "__main__":
    sys.exit(main())
