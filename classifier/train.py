"""Train the fastText-style model with torch and export it to ONNX (+ int8).

Model: mean of hashed-token embeddings (EmbeddingBag) -> a category softmax
head and a spam sigmoid head. Spam and ham without a known category train
only the spam head. Deterministic for a seed: one thread, seeded torch and
numpy, deterministic algorithms, a fixed input order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from classifier.corpus import Message, load_dir
from classifier.evaluate import Report, compute_report, format_report, report_dict
from classifier.features import FeatureParams, IdArray, extract_many
from classifier.model import MANIFEST_KEY, Manifest, encode_manifest

F32 = npt.NDArray[np.float32]


class TrainConfig(msgspec.Struct, frozen=True):
    dim: int = 32
    epochs: int = 10
    min_steps: int = 400  # small site folders get more passes, not an untrained head
    batch_size: int = 32
    lr: float = 0.01
    seed: int = 1
    hidden: int = 0  # a ReLU layer between the means and the heads (0: linear, fastText)
    token_dropout: float = 0.1
    average_from: float = 0.5  # average weights over epoch ends from this fraction of training on (0: off)  # drop tokens at random while training: less reliance on any one
    val_fraction: float = 0.1  # by message hash, for the report and the spam threshold
    opset: int = 17
    # Category loss weight ~ frequency ** -power: 0.5 (1/sqrt) for site
    # folders; 1.0 (balanced) when one class dwarfs the others, so a big
    # class does not become everybody's prior (the default model: list mail).
    class_weight_power: float = 0.5
    # Share of training messages whose whole text bag is dropped for a step:
    # the structure signals (headers, MIME) must then decide alone, so they
    # keep weight when the words are ones the corpora never tied to a class.
    text_bag_dropout: float = 0.0
    # A hidden layer of the spam head's own (0: the spam head shares the
    # category head's). Apart, the weight given to scarce modern spam moves
    # the spam tower, not the layer the category head reads; they still share
    # the embeddings.
    spam_hidden: int = 0


class Weights(msgspec.Struct):
    emb: F32  # [buckets, dim], row 0 (padding) is zero
    w_hid: F32 | None  # [2*dim, H] or None
    b_hid: F32 | None
    w_cat: F32  # [dim, C]
    b_cat: F32  # [C]
    w_spam: F32  # [dim, 1]
    b_spam: F32  # [1]
    w_hid_spam: F32 | None = None  # [2*dim, Hs]: the spam tower's own hidden layer
    b_hid_spam: F32 | None = None


def featurize(
    messages: Sequence[Message], params: FeatureParams, *, progress: bool = True
) -> list[IdArray]:
    from tqdm import tqdm

    out: list[IdArray] = []
    with tqdm(
        total=len(messages),
        desc="features",
        unit="msg",
        disable=not progress,
        file=sys.stderr,
        mininterval=1.0,
    ) as bar:
        for i in range(0, len(messages), 256):
            chunk = messages[i : i + 256]
            out.extend(extract_many([m.raw for m in chunk], params))
            bar.update(len(chunk))
    return out


def fit(
    ids: Sequence[IdArray],
    cat: npt.NDArray[np.int64],  # class index, -1: unknown (trains the spam head only)
    spam: npt.NDArray[np.float32],
    n_classes: int,
    params: FeatureParams,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    spam_weight: npt.NDArray[np.float32] | None = None,  # per message, the spam loss only
) -> Weights:
    import torch
    from torch import nn
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    rng = np.random.default_rng(cfg.seed)

    emb = nn.EmbeddingBag(params.buckets, cfg.dim, mode="mean")
    nn.init.uniform_(emb.weight, -1.0 / cfg.dim, 1.0 / cfg.dim)
    # Heads see [mean of structure tokens, mean of text tokens].
    width = cfg.hidden or 2 * cfg.dim
    lin = nn.Linear(2 * cfg.dim, cfg.hidden) if cfg.hidden else None
    hid: Any = nn.Sequential(lin, nn.ReLU()) if lin is not None else nn.Identity()
    head_cat = nn.Linear(width, max(n_classes, 1))
    lin_spam = nn.Linear(2 * cfg.dim, cfg.spam_hidden) if cfg.spam_hidden else None
    hid_spam: Any = nn.Sequential(lin_spam, nn.ReLU()) if lin_spam is not None else None
    head_spam = nn.Linear(cfg.spam_hidden or width, 1)
    model = nn.ModuleList([emb, hid, head_cat, head_spam, *([hid_spam] if hid_spam else [])])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    # Class weights ~ 1/sqrt(frequency): the small classes count for macro-F1.
    known = cat[cat >= 0]
    counts = np.bincount(known, minlength=n_classes).astype(np.float64) + 1.0
    cw = (counts.sum() / counts) ** cfg.class_weight_power
    cw = cw / cw.mean()
    ce = nn.CrossEntropyLoss(weight=torch.tensor(cw, dtype=torch.float32), reduction="sum")
    bce = nn.BCEWithLogitsLoss(reduction="none")
    sw = np.ones(len(ids), dtype=np.float32) if spam_weight is None else spam_weight

    slots = params.struct_slots
    structs = [a[:slots][a[:slots] > 0] for a in ids]
    texts = [a[slots:] for a in ids]

    def bag(arrays: list[IdArray]) -> Any:
        lengths = np.fromiter((x.shape[0] for x in arrays), dtype=np.int64, count=len(arrays))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        return emb(torch.from_numpy(np.concatenate(arrays).astype(np.int64)), offsets)

    n = len(ids)
    per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    epochs = max(cfg.epochs, -(-cfg.min_steps // max(per_epoch, 1)))
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.05, 1.0 - s / max(steps, 1)))
    bar = tqdm(
        total=steps,
        desc="train",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        mininterval=1.0,
    )
    avg: list[Any] | None = None
    n_avg = 0
    for _epoch in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            text_bags = []
            for i in idx:
                a = texts[i]
                if cfg.text_bag_dropout > 0 and rng.random() < cfg.text_bag_dropout:
                    a = a[:0]  # the whole text bag: structure alone must carry it
                elif cfg.token_dropout > 0 and a.shape[0] > 4:
                    a = a[rng.random(a.shape[0]) >= cfg.token_dropout]
                text_bags.append(a)
            means = torch.cat([bag([structs[i] for i in idx]), bag(text_bags)], dim=1)
            h = hid(means)
            hs = hid_spam(means) if hid_spam is not None else h
            y_spam = torch.from_numpy(spam[idx])
            loss = (bce(head_spam(hs).squeeze(1), y_spam) * torch.from_numpy(sw[idx])).mean()
            c = cat[idx]
            mask = c >= 0
            if mask.any():
                m = torch.from_numpy(mask)
                loss = loss + ce(head_cat(h[m]), torch.from_numpy(c[mask])) / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        if cfg.average_from > 0 and _epoch >= int(epochs * cfg.average_from):
            # Weight averaging over epoch ends (SWA, Izmailov et al. 2018): one
            # run's late snapshots lie in one basin; their mean is steadier than
            # any single snapshot (less seed-to-seed variance in the spam scores).
            with torch.no_grad():
                snap = [p.detach().clone() for p in model.parameters()]
                if avg is None:
                    avg, n_avg = snap, 1
                else:
                    n_avg += 1
                    for a, b in zip(avg, snap, strict=True):
                        a += (b - a) / n_avg
    bar.close()
    if avg is not None:
        with torch.no_grad():
            for p, a in zip(model.parameters(), avg, strict=True):
                p.copy_(a)
    with torch.no_grad():
        e = emb.weight.detach().numpy().astype(np.float32).copy()
        e[0] = 0.0  # padding row: contributes nothing to the sum
        return Weights(
            emb=e,
            w_hid=lin.weight.detach().numpy().T.astype(np.float32).copy()
            if lin is not None
            else None,
            b_hid=lin.bias.detach().numpy().astype(np.float32).copy() if lin is not None else None,
            w_cat=head_cat.weight.detach().numpy().T.astype(np.float32).copy(),
            b_cat=head_cat.bias.detach().numpy().astype(np.float32).copy(),
            w_spam=head_spam.weight.detach().numpy().T.astype(np.float32).copy(),
            b_spam=head_spam.bias.detach().numpy().astype(np.float32).copy(),
            w_hid_spam=lin_spam.weight.detach().numpy().T.astype(np.float32).copy()
            if lin_spam is not None
            else None,
            b_hid_spam=lin_spam.bias.detach().numpy().astype(np.float32).copy()
            if lin_spam is not None
            else None,
        )


def _mean_rows(emb: F32, a: IdArray) -> F32:
    a = a[a > 0]
    if a.shape[0] == 0:
        return np.zeros(emb.shape[1], dtype=np.float32)
    out: F32 = emb[a].mean(axis=0)
    return out


def forward_logits(w: Weights, ids: Sequence[IdArray], slots: int) -> tuple[F32, F32]:
    """(category logits [N, C], spam logit [N]): the graph before softmax / sigmoid."""
    if not ids:
        return np.zeros((0, w.w_cat.shape[1]), np.float32), np.zeros(0, np.float32)
    h = np.stack(
        [np.concatenate([_mean_rows(w.emb, a[:slots]), _mean_rows(w.emb, a[slots:])]) for a in ids]
    )
    means = h
    if w.w_hid is not None and w.b_hid is not None:
        h = np.maximum(h @ w.w_hid + w.b_hid, 0.0)
    hs = h
    if w.w_hid_spam is not None and w.b_hid_spam is not None:
        hs = np.maximum(means @ w.w_hid_spam + w.b_hid_spam, 0.0)
    logits: F32 = (h @ w.w_cat + w.b_cat).astype(np.float32)
    z: F32 = (hs @ w.w_spam + w.b_spam)[:, 0].astype(np.float32)
    return logits, z


def softmax(logits: npt.NDArray[np.floating[Any]]) -> F32:
    x = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(x)
    out: F32 = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def sigmoid(z: npt.NDArray[np.floating[Any]]) -> F32:
    out: F32 = (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)
    return out


def forward(w: Weights, ids: Sequence[IdArray], slots: int) -> tuple[F32, F32]:
    """The exported graph's math in numpy (for reports during training)."""
    logits, z = forward_logits(w, ids, slots)
    return softmax(logits), sigmoid(z)


# --- calibration ---------------------------------------------------------------
# Both heads are calibrated on messages the weights were not fitted on, so the
# stamped scores read as probabilities: a temperature for the category softmax
# (Guo et al. 2017, "On calibration of modern neural networks"; it keeps the
# argmax) and Platt scaling for the spam sigmoid (Platt 1999: sigmoid(a*z + b)).
# Both are affine in the last layer, so they are folded into the head weights
# (`calibrated`): the exported graph and the runtime do not change.


def fit_temperature(logits: F32, y: npt.NDArray[np.int64]) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (a 1-D search)."""
    if logits.shape[0] == 0:
        return 1.0
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 121)):
        x = logits / t
        x = x - x.max(axis=1, keepdims=True)
        nll = float(-(x[np.arange(len(y)), y] - np.log(np.exp(x).sum(axis=1))).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return round(best_t, 4)


def fit_platt(z: F32, y: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """(a, b) of sigmoid(a*z + b) minimising the log loss on (z, y).

    Targets are Platt's smoothed labels, (n+ + 1)/(n+ + 2) and 1/(n- + 2), so
    a perfectly separated slice does not send `a` to infinity. A grid over the
    slope with the (convex, 1-D) best intercept for each: no Newton step in 2-D
    to diverge on a nearly separable slice."""
    if z.shape[0] == 0 or y.all() or not y.any():
        return 1.0, 0.0
    zz = z.astype(np.float64)
    n_pos, n_neg = float(y.sum()), float((~y).sum())
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    best = (np.inf, 1.0, 0.0)
    for a in np.exp(np.linspace(np.log(0.02), np.log(4.0), 81)):
        b = 0.0
        for _ in range(30):
            p = 1.0 / (1.0 + np.exp(-np.clip(a * zz + b, -60, 60)))
            g, h = float((p - t).sum()), float((p * (1 - p)).sum()) + 1e-9
            b -= float(np.clip(g / h, -5, 5))
            if abs(g / h) < 1e-7:
                break
        x = np.clip(a * zz + b, -60, 60)
        loss = float((np.logaddexp(0, x) - t * x).mean())
        if loss < best[0]:
            best = (loss, float(a), b)
    return round(best[1], 5), round(best[2], 5)


def calibrated(w: Weights, temperature: float, platt: tuple[float, float]) -> Weights:
    """`w` with the temperature and Platt scaling folded into the two heads."""
    a, b = platt
    return Weights(
        emb=w.emb,
        w_hid=w.w_hid,
        b_hid=w.b_hid,
        w_cat=(w.w_cat / temperature).astype(np.float32),
        b_cat=(w.b_cat / temperature).astype(np.float32),
        w_spam=(w.w_spam * a).astype(np.float32),
        b_spam=(w.b_spam * a + b).astype(np.float32),
        w_hid_spam=w.w_hid_spam,
        b_hid_spam=w.b_hid_spam,
    )


def fp_threshold(
    scores: F32, ham_sets: Sequence[tuple[npt.NDArray[np.bool_], float]], floor: float = 0.5
) -> float:
    """The lowest spam threshold (>= `floor`, grid 0.01) at which, for each
    (mask of legitimate messages, max FP rate) pair, at most that share of the
    masked messages scores at or above it: the threshold a false-positive
    bound allows, not the best F1 (a postmaster counts lost mail, not F1)."""
    for t in np.arange(floor, 0.996, 0.01):
        if all(
            not mask.any() or float((scores[mask] >= t).mean()) <= max_fp
            for mask, max_fp in ham_sets
        ):
            return round(float(t), 3)
    return 0.995


def best_threshold(scores: F32, truth: npt.NDArray[np.bool_]) -> float:
    """The spam threshold with the best F1 on validation; ties go to the higher (fewer FPs)."""
    if not truth.any() or truth.all():
        return 0.5
    best, best_f1 = 0.5, -1.0
    for t in np.arange(0.02, 0.951, 0.01):
        pred = scores >= t
        tp = int((pred & truth).sum())
        fp = int((pred & ~truth).sum())
        fn = int((~pred & truth).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 >= best_f1:
            best, best_f1 = float(t), f1
    return round(best, 3)


def build_onnx(w: Weights, manifest: Manifest, opset: int = 17) -> Any:
    """ids [N, L] -> two bags (structure slots, text) -> masked means -> two Gemm heads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = w.w_cat.shape[1]
    slots = manifest.features.struct_slots
    inits = [
        numpy_helper.from_array(w.emb, "emb"),
        numpy_helper.from_array(w.w_cat, "w_cat"),
        numpy_helper.from_array(w.b_cat, "b_cat"),
        numpy_helper.from_array(w.w_spam, "w_spam"),
        numpy_helper.from_array(w.b_spam, "b_spam"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "start0"),
        numpy_helper.from_array(np.array([slots], dtype=np.int64), "slots"),
        numpy_helper.from_array(np.array([2**62], dtype=np.int64), "end"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]

    def mean_of(name: str, start: str, end: str) -> list[Any]:
        # Padding id 0 has a zero row: the sum ignores it; the count skips it.
        return [
            helper.make_node("Slice", ["ids", start, end, "axis1"], [f"{name}_ids"]),
            helper.make_node("Gather", ["emb", f"{name}_ids"], [f"{name}_vecs"], axis=0),
            helper.make_node("ReduceSum", [f"{name}_vecs", "axis1"], [f"{name}_sum"], keepdims=0),
            helper.make_node("Greater", [f"{name}_ids", "zero"], [f"{name}_real"]),
            helper.make_node("Cast", [f"{name}_real"], [f"{name}_realf"], to=TensorProto.FLOAT),
            helper.make_node(
                "ReduceSum", [f"{name}_realf", "axis1"], [f"{name}_count"], keepdims=1
            ),
            helper.make_node("Max", [f"{name}_count", "one"], [f"{name}_count1"]),
            helper.make_node("Div", [f"{name}_sum", f"{name}_count1"], [f"{name}_mean"]),
        ]

    if w.w_hid is not None and w.b_hid is not None:
        inits += [
            numpy_helper.from_array(w.w_hid, "w_hid"),
            numpy_helper.from_array(w.b_hid, "b_hid"),
        ]
        top = [
            helper.make_node("Gemm", ["means", "w_hid", "b_hid"], ["hidden"]),
            helper.make_node("Relu", ["hidden"], ["mean"]),
        ]
    else:
        top = [helper.make_node("Identity", ["means"], ["mean"])]
    spam_in = "mean"
    if w.w_hid_spam is not None and w.b_hid_spam is not None:
        # The spam tower: its own hidden layer over the same two means.
        inits += [
            numpy_helper.from_array(w.w_hid_spam, "w_hid_spam"),
            numpy_helper.from_array(w.b_hid_spam, "b_hid_spam"),
        ]
        top += [
            helper.make_node("Gemm", ["means", "w_hid_spam", "b_hid_spam"], ["hidden_spam"]),
            helper.make_node("Relu", ["hidden_spam"], ["mean_spam"]),
        ]
        spam_in = "mean_spam"
    nodes = [
        *mean_of("struct", "start0", "slots"),
        *mean_of("text", "slots", "end"),
        helper.make_node("Concat", ["struct_mean", "text_mean"], ["means"], axis=1),
        *top,
        helper.make_node("Gemm", ["mean", "w_cat", "b_cat"], ["cat_logits"]),
        helper.make_node("Softmax", ["cat_logits"], ["category_probs"], axis=1),
        helper.make_node("Gemm", [spam_in, "w_spam", "b_spam"], ["spam_logit"]),
        helper.make_node("Sigmoid", ["spam_logit"], ["spam_prob"]),
    ]
    graph = helper.make_graph(
        nodes,
        "triaged_fasttext",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [
            helper.make_tensor_value_info("category_probs", TensorProto.FLOAT, ["N", c]),
            helper.make_tensor_value_info("spam_prob", TensorProto.FLOAT, ["N", 1]),
        ],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="triaged"
    )
    model.ir_version = 8  # readable by onnxruntime >= 1.14
    helper.set_model_props(model, {MANIFEST_KEY: encode_manifest(manifest)})
    onnx.checker.check_model(model)
    return model


def save_onnx(model: Any, path: str | Path) -> None:
    import onnx

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """Dynamic int8: the embedding table (Gather) and heads; the manifest is kept."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=["Gather"], weight_type=QuantType.QUInt8
    )
    m = onnx.load_model(str(dst))
    props = {p.key: p.value for p in onnx.load_model(str(src)).metadata_props}
    manifest = msgspec.json.decode(props[MANIFEST_KEY])
    manifest["version"] = manifest["version"] + "-int8"
    onnx.helper.set_model_props(m, {MANIFEST_KEY: msgspec.json.encode(manifest).decode()})
    onnx.save_model(m, str(dst))


def split_by_hash(m: Message, fraction: float, salt: bytes = b"val") -> bool:
    """True for a fixed `fraction` of messages chosen by a hash of their bytes."""
    h = hashlib.sha256(salt + m.raw).digest()
    return int.from_bytes(h[:4], "big") < fraction * 2**32


class TrainResult(msgspec.Struct):
    weights: Weights
    labels: list[str]
    threshold: float
    validation: Report | None
    summary: dict[str, Any]


def train_messages(
    train: Sequence[Message],
    val: Sequence[Message],
    params: FeatureParams,
    cfg: TrainConfig,
    *,
    labels: list[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    labels = labels or sorted({m.category for m in train if m.category is not None})
    index = {c: i for i, c in enumerate(labels)}
    x = featurize(train, params, progress=progress)
    cat = np.array([index.get(m.category, -1) if m.category else -1 for m in train], dtype=np.int64)
    spam = np.array([1.0 if m.spam else 0.0 for m in train], dtype=np.float32)
    w = fit(x, cat, spam, len(labels), params, cfg, progress=progress)
    report = None
    threshold = 0.5
    if val:
        xv = featurize(val, params, progress=False)
        probs, sp = forward(w, xv, params.struct_slots)
        truth = np.array([m.spam for m in val])
        threshold = best_threshold(sp, truth)
        report = compute_report(
            labels,
            [m.category for m in val],
            [labels[i] for i in probs.argmax(axis=1)],
            list(truth),
            list(sp >= threshold),
        )
    summary = {
        "messages": len(train),
        "categories": dict(sorted(Counter(m.category for m in train if m.category).items())),
        "spam": int(spam.sum()),
        "ham_without_category": int(sum(1 for m in train if m.category is None and not m.spam)),
        "sources": dict(sorted(Counter(m.source for m in train).items())),
        "validation_messages": len(val),
        "config": msgspec.to_builtins(cfg),
    }
    return TrainResult(w, labels, threshold, report, summary)


def make_manifest(
    result: TrainResult,
    params: FeatureParams,
    name: str,
    version: str,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        labels=result.labels,
        features=params,
        spam_threshold=result.threshold,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        training=result.summary,
        metrics=metrics
        if metrics is not None
        else ({"validation": report_dict(result.validation)} if result.validation else {}),
    )


def export(
    result: TrainResult, manifest: Manifest, out: str | Path, *, int8: bool = True, opset: int = 17
) -> list[Path]:
    out = Path(out)
    save_onnx(build_onnx(result.weights, manifest, opset), out)
    paths = [out]
    if int8:
        q = out.with_name(out.stem + "-int8" + out.suffix)
        quantize_int8(out, q)
        paths.append(q)
    return paths


def train_dir(
    data_dir: str,
    out: str,
    *,
    spam_folder: str = "spam",
    cfg: TrainConfig | None = None,
    params: FeatureParams | None = None,
    name: str | None = None,
    version: str = "1",
    int8: bool = True,
    progress: bool = True,
) -> tuple[TrainResult, list[Path]]:
    """`triaged train`: DATA_DIR/<category>/..., a hash-chosen slice kept for validation."""
    cfg = cfg or TrainConfig()
    params = params or FeatureParams()
    messages = load_dir(data_dir, spam_folder=spam_folder)
    if not messages:
        raise ValueError(f"{data_dir}: no messages found (expected one subfolder per category)")
    val = [m for m in messages if split_by_hash(m, cfg.val_fraction)]
    train = [m for m in messages if not split_by_hash(m, cfg.val_fraction)]
    if not any(m.category for m in train):
        raise ValueError(f"{data_dir}: no category folder besides {spam_folder!r}")
    result = train_messages(train, val, params, cfg, progress=progress)
    manifest = make_manifest(result, params, name or Path(out).stem, version)
    paths = export(result, manifest, out, int8=int8, opset=cfg.opset)
    return result, paths


def print_validation(result: TrainResult) -> None:
    if result.validation is not None:
        print(format_report(result.validation, f"validation (spam threshold {result.threshold})"))


__all__ = [
    "TrainConfig",
    "TrainResult",
    "Weights",
    "build_onnx",
    "calibrated",
    "export",
    "featurize",
    "fit",
    "fit_platt",
    "fit_temperature",
    "forward",
    "forward_logits",
    "fp_threshold",
    "make_manifest",
    "print_validation",
    "quantize_int8",
    "sigmoid",
    "softmax",
    "split_by_hash",
    "train_dir",
    "train_messages",
]
