"""`triaged learn`: a candidate model from the current model plus the site's feedback.

A site has no training corpora, only its model and what its users did. So the
candidate is the current model's weights, read from the ONNX file, trained a
little further (warm start) on the feedback, with a light L2 pull back toward
the starting weights (the "anchor", as in L2-SP, Li et al. 2018). Feedback is
one-sided (a site's corrections are mostly one kind of mail), and on its own
it drags the other classes' boundaries along; so every step also rehearses a
batch of the replay sample shipped with the model (classifier/learning/
replay.py: feature ids and labels of a stratified sample of the training
data), held to the current model's outputs (distillation) and to the
sample's labels; the rows rehearsed are those the step's candidate gets most
wrong among a random pool (maximally interfered retrieval), not a blind
draw. bench/results/learning_curve.md measures each.
Confirmations (the user left the message where triaged put it) train too, at
a lower weight.

Weights per item: a correction counts `correction_weight` times a confirmation;
then each user's total is capped at `user_cap` (scaled down, not cut), so one
user's thousand moves weigh as much as `user_cap` items, not a thousand.

The manifest keeps its labels, feature parameters and spam threshold (the
calibration folded into the heads is the starting point and moves only as much
as the anchor lets it); `training` records the feedback counts and the parent.
Deterministic for a seed: one thread, seeded torch and numpy, fixed order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from classifier import headers
from classifier.features import IdArray
from classifier.model import MANIFEST_KEY, Manifest, ModelError, decode_manifest
from classifier.train import Weights, build_onnx

F32 = npt.NDArray[np.float32]
HAM_LABEL = "ham"  # not spam, of no category (a move out of Junk into the inbox)


class TorchMissing(RuntimeError):
    """`triaged learn` needs the `train` extra (torch, onnx)."""


class Feedback(Protocol):
    """What learn reads of a feedback item (classifier.learning.store.FeedbackItem)."""

    @property
    def raw(self) -> bytes: ...
    @property
    def label(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def kind(self) -> str: ...  # "correction" | "confirmation"
    @property
    def time(self) -> float: ...
    @property
    def body_hash(self) -> str: ...


T = TypeVar("T", bound=Feedback)


class LearnConfig(msgspec.Struct, frozen=True):
    seed: int = 1
    epochs: int = 8
    min_steps: int = 60
    batch_size: int = 16
    lr: float = 0.01
    # L2 pull toward the current weights (`triaged learn --anchor`). Without a replay
    # sample it only trades learning against forgetting (bench/results/learning_curve.md:
    # 0.1 lifts a held-out source 0.65 -> 0.997 but the other sources' macro-F1 falls
    # 0.93 -> 0.73); with the sample rehearsed beside the feedback, a light pull is best.
    anchor: float = 0.01
    correction_weight: float = 4.0  # a correction counts this many confirmations
    user_cap: float = 50.0  # one user's items weigh at most this many items in all
    holdout_fraction: float = 0.2  # by body hash: the gate's slice, never trained on
    # Rehearsal on the replay sample shipped with the model (classifier/learning/replay.py):
    # each step also draws `replay_batch` sample rows and pulls the candidate's outputs on
    # them toward the current model's (distillation), weighted `replay_weight` against the
    # feedback's loss. Without it a site's one-sided feedback drags the other classes along.
    # Weights chosen on bench/learning_curve.py (Enron held out of the base): distillation
    # alone (weight 1-16, batch 32) kept 5 shop notices of the other sources filed as
    # `primary`; with the sample's own labels too (weight 4-8) and 128 rows a step, 0-2;
    # with 256 rows a step chosen as below (replay_pool), 0-1.
    replay_batch: int = 256
    replay_weight: float = 4.0  # distillation: KL to the current model's outputs
    replay_labels: float = 8.0  # the sample's own labels (cross-entropy), beside distillation
    # Which rows each step rehearses: of `replay_pool` rows drawn at random, the
    # `replay_batch` the candidate currently gets most wrong (distillation + label loss):
    # "maximally interfered retrieval" (Aljundi et al. 2019). Drawn blindly, the rows
    # that the feedback's class is pulling over are a few of 3,000 and seldom rehearsed;
    # bench/results/learning_curve.md: the other sources' notices and newsletters newly
    # filed `primary` after 200 Enron corrections went from 0-3 per seed to 0-1 (the 1:
    # a bounce the base itself puts at 0.48 `primary`). A pool of the whole sample did
    # worse than 1,024 (the random draw keeps the rehearsal varied).
    # 0 (or <= replay_batch): rows drawn at random.
    replay_pool: int = 1024


def require_train_extra() -> None:
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise TorchMissing(
            f"triaged learn needs torch and onnx ({exc.name} is not installed): "
            "pip install 'triaged[train]'"
        ) from None


def read_model(path: str | Path) -> tuple[Weights, Manifest]:
    """The fp32 weights and the manifest of a triaged ONNX file (for a warm start)."""
    import onnx
    from onnx import numpy_helper

    try:
        m = onnx.load_model(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"{path}: cannot read the ONNX file ({exc})") from None
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    props = {p.key: p.value for p in m.metadata_props}
    if MANIFEST_KEY not in props:
        raise ModelError(f"{path}: no triaged manifest in the ONNX metadata")
    manifest = decode_manifest(props[MANIFEST_KEY], str(path))
    need = ("emb", "w_cat", "b_cat", "w_spam", "b_spam")
    if any(n not in inits or inits[n].dtype != np.float32 for n in need):
        raise ModelError(
            f"{path}: no fp32 weights to start from (an int8 model?); learn from the fp32 file"
        )

    def f32(name: str) -> F32:
        return np.ascontiguousarray(inits[name], dtype=np.float32)

    hid = "w_hid" in inits
    tower = "w_hid_spam" in inits  # the spam head's own hidden layer (train.TrainConfig.spam_hidden)
    return (
        Weights(
            emb=f32("emb"),
            w_hid=f32("w_hid") if hid else None,
            b_hid=f32("b_hid") if hid else None,
            w_cat=f32("w_cat"),
            b_cat=f32("b_cat"),
            w_spam=f32("w_spam"),
            b_spam=f32("b_spam"),
            w_hid_spam=f32("w_hid_spam") if tower else None,
            b_hid_spam=f32("b_hid_spam") if tower else None,
        ),
        manifest,
    )


def unstamped(raw: bytes) -> bytes:
    """`raw` without our X-Triage-* fields: the store keeps them (they say what was
    decided), but the server strips incoming copies before it classifies, so the
    model never sees them and must not learn from them."""
    block = headers.head(raw)
    ours = {
        m.group(1).lower()
        for m in headers.FIELD.finditer(block)
        if m.group(1).lower().startswith(b"x-triage-")
    }
    return headers.remove(block, ours) + raw[len(block) :] if ours else raw


def in_holdout(body_hash: str, fraction: float) -> bool:
    """The gate's slice: a fixed share of items by a hash of the body hash."""
    h = hashlib.sha256(b"gate:" + body_hash.encode()).digest()
    return int.from_bytes(h[:4], "big") < fraction * 2**32


def latest_per_message(items: Sequence[T]) -> list[T]:
    """One item per body (the latest decision wins: a user may move it twice), in a fixed order."""
    last: dict[str, T] = {}
    for it in sorted(items, key=lambda i: (i.time, i.body_hash)):
        last[it.body_hash] = it
    return sorted(last.values(), key=lambda i: i.body_hash)


def split(items: Sequence[T], fraction: float) -> tuple[list[T], list[T]]:
    """(train, holdout) of the de-duplicated items."""
    items = latest_per_message(items)
    hold = [i for i in items if in_holdout(i.body_hash, fraction)]
    train = [i for i in items if not in_holdout(i.body_hash, fraction)]
    return train, hold


def item_weights(items: Sequence[Feedback], cfg: LearnConfig) -> F32:
    """Correction > confirmation; each user's sum capped at `user_cap`; mean 1."""
    w = np.array(
        [cfg.correction_weight if i.kind == "correction" else 1.0 for i in items], dtype=np.float64
    )
    for user in {i.user for i in items}:
        mask = np.array([i.user == user for i in items])
        total = float(w[mask].sum())
        if total > cfg.user_cap:
            w[mask] *= cfg.user_cap / total
    if w.size:
        w *= w.size / w.sum()
    return w.astype(np.float32)


def targets(
    items: Sequence[Feedback], manifest: Manifest
) -> tuple[npt.NDArray[np.int64], F32, list[str]]:
    """(category index or -1, spam 0/1, unknown labels). The spam label and "ham" (not
    spam, no category) train the spam head only; a category label says "this
    category, and not spam"."""
    index = {c: k for k, c in enumerate(manifest.labels)}
    cat, spam, unknown = [], [], []
    for it in items:
        if it.label == manifest.spam_label:
            cat.append(-1)
            spam.append(1.0)
        elif it.label == HAM_LABEL:
            cat.append(-1)
            spam.append(0.0)
        elif it.label in index:
            cat.append(index[it.label])
            spam.append(0.0)
        else:
            unknown.append(it.label)
            cat.append(-2)  # dropped by the caller
            spam.append(0.0)
    return np.array(cat, dtype=np.int64), np.array(spam, dtype=np.float32), unknown


def finetune(
    start: Weights,
    ids: Sequence[IdArray],
    cat: npt.NDArray[np.int64],
    spam: F32,
    weight: F32,
    slots: int,
    cfg: LearnConfig,
    *,
    replay: Sequence[IdArray] = (),
    replay_targets: tuple[npt.NDArray[np.int64], F32] | None = None,
    progress: bool = False,
) -> Weights:
    """`start` trained further on (ids, cat, spam) with per-item weights and the anchor,
    rehearsing `replay` (feature ids) against the starting model's own outputs."""
    import torch
    from torch import nn
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    rng = np.random.default_rng(cfg.seed)

    def t(a: F32) -> Any:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    def hidden(w: F32 | None, b: F32 | None) -> Any:
        """A ReLU layer started from the model's weights, or None where it has none."""
        if w is None or b is None:
            return None
        lin = nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(t(w.T))
            lin.bias.copy_(t(b))
        return nn.Sequential(lin, nn.ReLU())

    emb = nn.EmbeddingBag.from_pretrained(t(start.emb), freeze=False, mode="mean")
    shared = hidden(start.w_hid, start.b_hid)
    hid: Any = shared if shared is not None else nn.Identity()
    hid_spam: Any = hidden(start.w_hid_spam, start.b_hid_spam)
    # The linear layers, read back when the candidate's weights are exported.
    lin: Any = shared[0] if shared is not None else None
    lin_spam: Any = hid_spam[0] if hid_spam is not None else None
    head_cat = nn.Linear(*start.w_cat.shape)
    head_spam = nn.Linear(*start.w_spam.shape)
    with torch.no_grad():
        head_cat.weight.copy_(t(start.w_cat.T))
        head_cat.bias.copy_(t(start.b_cat))
        head_spam.weight.copy_(t(start.w_spam.T))
        head_spam.bias.copy_(t(start.b_spam))
    model = nn.ModuleList([emb, hid, head_cat, head_spam, *([hid_spam] if hid_spam else [])])
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    structs = [a[:slots][a[:slots] > 0] for a in ids]
    texts = [a[slots:][a[slots:] > 0] for a in ids]

    def bag(arrays: list[IdArray]) -> Any:
        lengths = np.fromiter((x.shape[0] for x in arrays), dtype=np.int64, count=len(arrays))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
        return emb(torch.from_numpy(np.concatenate(arrays).astype(np.int64)), offsets)

    def forward(bs: list[IdArray], ts: list[IdArray]) -> tuple[Any, Any]:
        """(category logits, spam logit) as the exported graph computes them."""
        means = torch.cat([bag(bs), bag(ts)], 1)
        h = hid(means)
        hs = hid_spam(means) if hid_spam is not None else h  # the spam tower, when there is one
        return head_cat(h), head_spam(hs).squeeze(1)

    r_structs = [a[:slots][a[:slots] > 0] for a in replay]
    r_texts = [a[slots:][a[slots:] > 0] for a in replay]
    if replay:  # the teacher: the starting model's outputs, fixed for the whole run
        with torch.no_grad():
            t_logits, t_z = forward(r_structs, r_texts)
            t_prob, t_spam = torch.softmax(t_logits, 1), torch.sigmoid(t_z)

    def rehearsal_rows(total: int) -> Any:
        """This step's replay rows: at random, or the most interfered of a random pool."""
        pick = torch.from_numpy(rng.choice(total, size=min(max(cfg.replay_pool, cfg.replay_batch), total),
                                           replace=False))  # fmt: skip
        if pick.shape[0] <= cfg.replay_batch:
            return pick
        with torch.no_grad():
            logits, z = forward([r_structs[i] for i in pick], [r_texts[i] for i in pick])
            logp = nn.functional.log_softmax(logits, 1)
            tp = t_prob[pick]
            score = (tp * (torch.log(tp + 1e-9) - logp)).sum(1)  # per-row KL to the teacher
            score = score + nn.functional.binary_cross_entropy_with_logits(
                z, t_spam[pick], reduction="none"
            )
            if replay_targets is not None and cfg.replay_labels > 0:
                rc = torch.from_numpy(replay_targets[0][pick.numpy()])
                own = -logp.gather(1, rc.clamp(min=0)[:, None]).squeeze(1)  # the label's loss
                score = score + torch.where(rc >= 0, own, torch.zeros_like(own))
        return pick[torch.argsort(score, descending=True, stable=True)[: cfg.replay_batch]]

    n = len(ids)
    per_epoch = -(-n // cfg.batch_size)
    epochs = max(cfg.epochs, -(-cfg.min_steps // max(per_epoch, 1)))
    bar = tqdm(total=epochs * per_epoch, desc="learn", unit="step", disable=not progress,
               file=sys.stderr, mininterval=1.0)  # fmt: skip
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            means = torch.cat([bag([structs[i] for i in idx]), bag([texts[i] for i in idx])], 1)
            h = hid(means)
            hs = hid_spam(means) if hid_spam is not None else h
            wt = t(weight[idx])
            loss = (
                nn.functional.binary_cross_entropy_with_logits(
                    head_spam(hs).squeeze(1), t(spam[idx]), reduction="none"
                )
                * wt
            ).sum()
            c = cat[idx]
            mask = c >= 0
            if mask.any():
                m = torch.from_numpy(mask)
                ce = nn.functional.cross_entropy(
                    head_cat(h[m]), torch.from_numpy(c[mask]), reduction="none"
                )
                loss = loss + (ce * wt[m]).sum()
            loss = loss / len(idx)
            if replay and (cfg.replay_weight > 0 or cfg.replay_labels > 0):
                r = rehearsal_rows(len(replay))
                s_logits, s_z = forward([r_structs[i] for i in r], [r_texts[i] for i in r])
                kd = nn.functional.kl_div(
                    nn.functional.log_softmax(s_logits, 1), t_prob[r], reduction="batchmean"
                ) + nn.functional.binary_cross_entropy_with_logits(s_z, t_spam[r])
                loss = loss + cfg.replay_weight * kd
                if replay_targets is not None and cfg.replay_labels > 0:
                    rc, rs = replay_targets[0][r.numpy()], replay_targets[1][r.numpy()]
                    hard = nn.functional.binary_cross_entropy_with_logits(s_z, t(rs))
                    if (rc >= 0).any():
                        m = torch.from_numpy(rc >= 0)
                        hard = hard + nn.functional.cross_entropy(s_logits[m], torch.from_numpy(rc[rc >= 0]))
                    loss = loss + cfg.replay_labels * hard
            loss = loss + cfg.anchor * sum(
                ((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
    bar.close()
    with torch.no_grad():
        e = emb.weight.detach().numpy().astype(np.float32).copy()
        e[0] = 0.0  # padding row: contributes nothing
        return Weights(
            emb=e,
            w_hid=lin.weight.detach().numpy().T.astype(np.float32).copy() if lin is not None else None,
            b_hid=lin.bias.detach().numpy().astype(np.float32).copy() if lin is not None else None,
            w_cat=head_cat.weight.detach().numpy().T.astype(np.float32).copy(),
            b_cat=head_cat.bias.detach().numpy().astype(np.float32).copy(),
            w_spam=head_spam.weight.detach().numpy().T.astype(np.float32).copy(),
            b_spam=head_spam.bias.detach().numpy().astype(np.float32).copy(),
            w_hid_spam=lin_spam.weight.detach().numpy().T.astype(np.float32).copy() if lin_spam is not None else None,
            b_hid_spam=lin_spam.bias.detach().numpy().astype(np.float32).copy() if lin_spam is not None else None,
        )  # fmt: skip


class LearnResult(msgspec.Struct):
    weights: Weights
    manifest: Manifest
    train: int
    holdout: list[Any]  # the gate's items (Feedback)
    summary: dict[str, Any]
    trained: list[Any] = msgspec.field(default_factory=list)  # the items trained on (the gate's fit check)


def learn(
    model_path: str | Path,
    items: Sequence[Feedback],
    cfg: LearnConfig,
    *,
    replay: str | Path | None = None,
    progress: bool = False,
) -> LearnResult:
    """Warm-start a candidate from `model_path` on the training share of `items`,
    rehearsing the replay sample at `replay` (ReplayError if it does not fit the model)."""
    from classifier.learning import replay as replay_mod
    from classifier.learning.feature_items import ids_for

    require_train_extra()
    start, manifest = read_model(model_path)
    sample = (
        replay_mod.load(replay, manifest.features, manifest.labels) if replay is not None else None
    )
    train, hold = split(items, cfg.holdout_fraction)
    cat, spam, unknown = targets(train, manifest)
    keep = cat >= -1
    train = [it for it, k in zip(train, keep, strict=True) if k]
    cat, spam = cat[keep], spam[keep]
    ids, usable = ids_for(train, manifest.features)
    stale = len(train) - sum(usable)  # feature items hashed for other features: left out
    if stale:
        u = np.array(usable)
        train = [it for it, ok in zip(train, usable, strict=True) if ok]
        ids = [a for a, ok in zip(ids, usable, strict=True) if ok]
        cat, spam = cat[u], spam[u]
    if not train:
        raise ValueError("no feedback to learn from (after the held-out slice and unknown labels)")
    weights = finetune(start, ids, cat, spam, item_weights(train, cfg), manifest.features.struct_slots,
                       cfg, replay=sample.ids if sample is not None else (),
                       replay_targets=(sample.cat, sample.spam) if sample is not None else None,
                       progress=progress)  # fmt: skip
    summary = {
        "parent": f"{manifest.name}/{manifest.version}",
        "feedback": len(train),
        "holdout": len(hold),
        "kinds": dict(sorted(Counter(i.kind for i in train).items())),
        "labels": dict(sorted(Counter(i.label for i in train).items())),
        "users": len({i.user for i in train}),
        "unknown_labels": dict(sorted(Counter(unknown).items())),
        "stale_features": stale,
        "replay": {"path": str(replay), "rows": len(sample), "origin": sample.meta.get("origin", "")}
        if sample is not None
        else None,
        "config": msgspec.to_builtins(cfg),
    }
    new_manifest = msgspec.structs.replace(
        manifest,
        version=f"{manifest.version.split('+')[0]}+learn.{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}",
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        training={**manifest.training, "learn": summary},
    )
    return LearnResult(weights, new_manifest, len(train), list(hold), summary, list(train))


def write_candidate(result: LearnResult, out: str | Path) -> Path:
    """The candidate's ONNX file (written atomically: a reader never sees half of it)."""
    from classifier.learning.gate import atomic_write

    model = build_onnx(result.weights, result.manifest)
    out = Path(out)
    atomic_write(out, model.SerializeToString())
    return out


__all__ = [
    "Feedback",
    "LearnConfig",
    "LearnResult",
    "TorchMissing",
    "finetune",
    "in_holdout",
    "item_weights",
    "latest_per_message",
    "learn",
    "read_model",
    "require_train_extra",
    "split",
    "targets",
    "unstamped",
    "write_candidate",
]
