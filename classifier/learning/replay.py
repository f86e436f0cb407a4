"""The replay sample shipped with a model: what `triaged learn` rehearses so that
a site's feedback does not make the model forget the rest of its training.

Fine-tuning on a few hundred corrections that are all one kind of mail (a
site's personal mail, say) pulls every class boundary toward that kind: the
L2 anchor alone only trades learning against forgetting (bench/results/
learning_curve.md). Rehearsal fixes that (Robins 1995; "experience replay"
in continual learning): a small stratified sample of the base model's
training data is trained on beside the feedback, with the current model's
own outputs as soft targets (distillation, Hinton et al. 2015; as in
"Learning without Forgetting", Li & Hoiem 2017), so the candidate keeps the
current model's answers on mail like the training corpora while it learns
the site's corrections.

What the file holds, and why only that: the hashed feature ids of each
sampled message (structure ids, then at most `text_ids` of its text ids,
drawn at random: the model averages a bag, so a random subset keeps the
mean) and its labels. No message text, addresses or headers: the training
corpora's licences do not all allow redistributing the messages (Enron and
the public lists are fine to train on, not ours to re-publish in a package),
and the messages are other people's mail. Hashed ids (salted 16-bit buckets,
many words per bucket) cannot be read back into text.

The ids are only meaningful for the feature parameters they were hashed
with, so the file records them, and `load` refuses a sample whose parameters
differ from the model's (a model rebuilt on a new feature version needs its
sample regenerated: `python models/default_recipe.py replay`).

Format: one numpy .npz (no pickles): `ids` (uint16, or uint32 for more than
65,536 buckets) all rows concatenated, `struct_len` and `text_len` per row,
`cat` (int8, -1: no category), `spam` (uint8), and `meta` (UTF-8 JSON: format,
feature parameters, labels, counts per stratum, where it came from).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from classifier.features import FeatureParams, IdArray

FORMAT = 1
K = TypeVar("K", bound=Hashable)
DEFAULT_ROWS = 3000
DEFAULT_TEXT_IDS = 160


class ReplayError(ValueError):
    """The replay sample cannot be used with this model; the message says why."""


class ReplaySample(msgspec.Struct):
    features: FeatureParams
    labels: list[str]  # the category head's classes, index = cat
    ids: list[IdArray]  # per row: struct ids padded to struct_slots, then text ids
    cat: npt.NDArray[np.int64]  # class index or -1 (no category: spam, uncategorised ham)
    spam: npt.NDArray[np.float32]  # 0 / 1
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


def _allocate(sizes: dict[K, int], total: int) -> dict[K, int]:
    """Rows per stratum: water-filling, so small strata come whole and big ones
    are capped alike (every source and class is represented, none dominates)."""
    if sum(sizes.values()) <= total:
        return dict(sizes)
    lo, hi = 0, max(sizes.values())
    while lo < hi:  # the largest cap whose total fits
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in sizes.values()) <= total:
            lo = mid
        else:
            hi = mid - 1
    return {k: min(n, lo) for k, n in sizes.items()}


BUNDLED = Path(__file__).resolve().parent.parent.parent / "models" / "default.replay.npz"


def beside(model: str | Path) -> Path:
    """Where a model's replay sample lives: models/default.onnx -> models/default.replay.npz."""
    m = Path(model)
    return m.with_name(m.name.removesuffix(".onnx") + ".replay.npz")


def find_sample(model: str | Path) -> Path | None:
    """The replay sample for `model`: beside it, else the bundled one (a learnt model
    keeps its parent's features, so the shipped sample still fits; `load` checks)."""
    for p in (beside(model), BUNDLED):
        if p.is_file():
            return p
    return None


def build_sample(
    ids: Sequence[IdArray],
    categories: Sequence[str | None],
    spam: Sequence[bool],
    strata: Sequence[str],
    params: FeatureParams,
    labels: Sequence[str],
    *,
    rows: int = DEFAULT_ROWS,
    text_ids: int = DEFAULT_TEXT_IDS,
    seed: int = 1,
    origin: str = "",
) -> ReplaySample:
    """A stratified sample of training messages (by `strata`, e.g. the source,
    crossed with category and spam) as feature ids, at most `rows` rows."""
    rng = np.random.default_rng(seed)
    index = {c: k for k, c in enumerate(labels)}
    groups: dict[tuple[str, str, bool], list[int]] = defaultdict(list)
    for i, (c, s, st) in enumerate(zip(categories, spam, strata, strict=True)):
        groups[(st, c or "", bool(s))].append(i)
    take = _allocate({k: len(v) for k, v in groups.items()}, rows)
    chosen: list[int] = []
    for key in sorted(groups, key=str):
        members = groups[key]
        pick = rng.choice(len(members), size=take[key], replace=False)
        chosen.extend(members[j] for j in sorted(pick))
    slots = params.struct_slots
    out_ids: list[IdArray] = []
    for i in chosen:
        a = ids[i]
        text = a[slots:][a[slots:] > 0]
        if text.shape[0] > text_ids:
            text = text[np.sort(rng.choice(text.shape[0], size=text_ids, replace=False))]
        struct = np.zeros(slots, dtype=np.int64)
        s_ids = a[:slots][a[:slots] > 0]
        struct[: s_ids.shape[0]] = s_ids
        out_ids.append(np.concatenate([struct, text]).astype(np.int64))
    strata_counts = {"/".join(str(x) for x in k): take[k] for k in groups if take[k]}
    meta = {
        "format": FORMAT,
        "features": msgspec.to_builtins(params),
        "labels": list(labels),
        "rows": len(chosen),
        "text_ids": text_ids,
        "seed": seed,
        "origin": origin,
        "strata": dict(sorted(strata_counts.items())),
    }
    return ReplaySample(
        features=params,
        labels=list(labels),
        ids=out_ids,
        cat=np.array([index.get(categories[i] or "", -1) for i in chosen], np.int64),
        spam=np.array([1.0 if spam[i] else 0.0 for i in chosen], np.float32),
        meta=meta,
    )


def save(sample: ReplaySample, path: str | Path) -> Path:
    """Write `sample` as .npz (atomically: temp file, fsync, rename)."""
    from classifier.learning.gate import atomic_write

    slots = sample.features.struct_slots
    dtype = np.uint16 if sample.features.buckets <= 1 << 16 else np.uint32
    structs = [a[:slots][a[:slots] > 0] for a in sample.ids]
    texts = [a[slots:] for a in sample.ids]
    flat = np.concatenate([x for pair in zip(structs, texts, strict=True) for x in pair])
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        ids=flat.astype(dtype),
        struct_len=np.array([s.shape[0] for s in structs], np.int16),
        text_len=np.array([t.shape[0] for t in texts], np.int32),
        cat=sample.cat.astype(np.int8),
        spam=sample.spam.astype(np.uint8),
        meta=np.frombuffer(json.dumps(sample.meta, sort_keys=True).encode(), np.uint8),
    )
    path = Path(path)
    atomic_write(path, buf.getvalue())
    os.chmod(path, 0o644)  # shipped beside the model, read by whoever runs learn
    return path


def load(path: str | Path, params: FeatureParams, labels: Sequence[str]) -> ReplaySample:
    """Read a replay sample for a model with `params` and `labels`; ReplayError
    when it is unreadable or was built for other features or classes."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("ids", "struct_len", "text_len", "cat", "spam", "meta")}
        meta = json.loads(arrays["meta"].tobytes().decode())
        fmt = meta.get("format")
        built_for = msgspec.convert(meta["features"], FeatureParams)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error,
            msgspec.ValidationError) as exc:  # fmt: skip
        raise ReplayError(f"{path}: not a readable replay sample ({exc})") from None
    if fmt != FORMAT:
        raise ReplayError(f"{path}: replay sample format {fmt}, this triaged reads {FORMAT}")
    if built_for != params:
        what = (
            f"feature version {built_for.version}, the model uses {params.version}"
            if built_for.version != params.version
            else "other feature parameters than the model's"
        )
        raise ReplayError(
            f"{path}: replay sample built for {what}; regenerate it for this model "
            "(python models/default_recipe.py replay) or learn without it (--no-replay)"
        )
    if list(meta.get("labels", [])) != list(labels):
        raise ReplayError(
            f"{path}: replay sample labels {meta.get('labels')} differ from the model's {list(labels)}"
        )
    slots = params.struct_slots
    flat = arrays["ids"].astype(np.int64)
    ids: list[IdArray] = []
    pos = 0
    for s_len, t_len in zip(arrays["struct_len"].tolist(), arrays["text_len"].tolist(), strict=True):
        struct = np.zeros(slots, dtype=np.int64)
        struct[:s_len] = flat[pos : pos + s_len]
        pos += s_len
        ids.append(np.concatenate([struct, flat[pos : pos + t_len]]))
        pos += t_len
    if pos != flat.shape[0] or len(ids) != arrays["cat"].shape[0]:
        raise ReplayError(f"{path}: replay sample arrays do not add up (a damaged file?)")
    return ReplaySample(
        features=params,
        labels=list(labels),
        ids=ids,
        cat=arrays["cat"].astype(np.int64),
        spam=arrays["spam"].astype(np.float32),
        meta=meta,
    )


__all__ = ["BUNDLED", "ReplayError", "ReplaySample", "beside", "build_sample", "find_sample", "load", "save"]
