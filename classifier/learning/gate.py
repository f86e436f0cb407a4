"""The gate: a candidate model replaces the running one only if it is better.

Two checks, both on the real ONNX files through onnxruntime (the candidate
must load as the server would load it):
- the site's held-out feedback (a slice chosen by body hash, never trained
  on): the candidate's agreement with the users' labels must beat the current
  model's by at least `min_gain`, on at least `min_holdout` items;
- a canary set shipped with the model (models/canary/<category>/*.eml, hand
  written, none of them spam): the candidate's category accuracy may fall at
  most `canary_margin` below the current model's, and it may call at most
  `max_new_canary_spam` more of them spam than the current model does;
- the feedback it was trained on: the candidate must agree with at least
  `min_fit` of it. Feedback a model cannot fit (labels shuffled, a user or a
  script dragging at random, users contradicting each other) is noise, and on
  a small held-out slice noise can beat the current model by chance: a
  candidate from shuffled labels once gained 0.25 -> 0.5 on 8 held-out items
  while fitting 28% of its own feedback (a sound one fits 100%).

Promotion writes the model file atomically (temp file in the same folder,
fsync, rename, fsync of the folder: a crash leaves the old file or the new
one, never half of one) and keeps the previous file as PATH.prev for
`triaged rollback`. The running server picks the new file up on SIGHUP.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from classifier.corpus import iter_path
from classifier.learning.feature_items import ids_for
from classifier.learning.learn import HAM_LABEL
from classifier.model import LoadedModel, load_model

CANARY_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "canary"


class GateConfig(msgspec.Struct, frozen=True):
    min_holdout: int = 10  # fewer held-out items than this: no decision, the model stays
    min_gain: float = 0.01  # held-out agreement must rise by at least this much
    canary_margin: float = 0.05  # canary accuracy may fall at most this much
    max_new_canary_spam: int = 0  # canary (wanted) messages newly called spam
    min_fit: float = 0.75  # the candidate's agreement with the feedback it was trained on


class Figures(msgspec.Struct):
    holdout: int
    holdout_agreement: float
    canary: int
    canary_accuracy: float
    canary_spam: int
    feedback_fit: float | None = None  # agreement with the feedback trained on (candidate)


class Decision(msgspec.Struct):
    accepted: bool
    reasons: list[str]
    current: Figures
    candidate: Figures
    current_model: str
    candidate_model: str


def agreement(model: LoadedModel, items: Sequence[Any]) -> float:
    """Share of items where the model gives the user's label (category and not spam, or spam)."""
    if not items:
        return 0.0
    ids, usable = ids_for(items, model.manifest.features)
    items = [i for i, ok in zip(items, usable, strict=True) if ok]
    if not items:
        return 0.0
    preds = model.predict([a for a, ok in zip(ids, usable, strict=True) if ok])
    spam_label = model.manifest.spam_label
    ok = [
        bool(p.spam)
        if i.label == spam_label
        else (not p.spam if i.label == HAM_LABEL else (p.category == i.label and not p.spam))
        for i, p in zip(items, preds, strict=True)
    ]
    return float(np.mean(ok))


def load_canary(root: Path = CANARY_DIR) -> list[tuple[str, bytes]]:
    """(category, raw) for each canary message: root/<category>/..."""
    out: list[tuple[str, bytes]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        out.extend((sub.name, raw) for _, raw in iter_path(sub))
    return out


def figures(model: LoadedModel, holdout: Sequence[Any], canary: list[tuple[str, bytes]]) -> Figures:
    preds = model.predict(model.featurize_many([raw for _, raw in canary])) if canary else []
    return Figures(
        holdout=len(holdout),
        holdout_agreement=round(agreement(model, holdout), 4),
        canary=len(canary),
        canary_accuracy=round(
            float(np.mean([p.category == c for (c, _), p in zip(canary, preds, strict=True)]))
            if canary
            else 0.0,
            4,
        ),
        canary_spam=sum(bool(p.spam) for p in preds),
    )


def decide(
    current: LoadedModel,
    candidate: LoadedModel,
    holdout: Sequence[Any],
    canary: list[tuple[str, bytes]],
    cfg: GateConfig,
    trained: Sequence[Any] = (),
) -> Decision:
    """Accept or refuse `candidate`; `trained`: the feedback it was trained on (the fit check)."""
    cur, cand = figures(current, holdout, canary), figures(candidate, holdout, canary)
    reasons = []
    if trained:
        cand.feedback_fit = round(agreement(candidate, trained), 4)
        cur.feedback_fit = round(agreement(current, trained), 4)
        if cand.feedback_fit < cfg.min_fit:
            reasons.append(f"the candidate agrees with only {cand.feedback_fit} of the feedback it was "
                           f"trained on (min_fit {cfg.min_fit}): inconsistent or random labels")  # fmt: skip
    if current.manifest.labels != candidate.manifest.labels:
        reasons.append("labels differ from the current model's")
    if current.manifest.features != candidate.manifest.features:
        reasons.append("feature parameters differ from the current model's")
    if len(holdout) < cfg.min_holdout:
        reasons.append(f"{len(holdout)} held-out feedback items, fewer than {cfg.min_holdout}")
    gain = cand.holdout_agreement - cur.holdout_agreement
    if gain < cfg.min_gain:
        reasons.append(f"held-out agreement {cur.holdout_agreement} -> "
                       f"{cand.holdout_agreement}, gain below {cfg.min_gain}")  # fmt: skip
    if cand.canary_accuracy < cur.canary_accuracy - cfg.canary_margin:
        reasons.append(f"canary accuracy {cur.canary_accuracy} -> {cand.canary_accuracy}, "
                       f"below the floor (margin {cfg.canary_margin})")  # fmt: skip
    if cand.canary_spam > cur.canary_spam + cfg.max_new_canary_spam:
        reasons.append(f"canary messages called spam {cur.canary_spam} -> {cand.canary_spam}")
    return Decision(not reasons, reasons, cur, cand, current.name_version, candidate.name_version)


# --- files -----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader or a crash sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def previous_path(model: Path) -> Path:
    return model.with_name(model.name + ".prev")


def promote(candidate: Path, model: Path) -> None:
    """`candidate` becomes `model`; the file it replaces is kept as `model`.prev."""
    data = candidate.read_bytes()
    atomic_write(previous_path(model), model.read_bytes())
    atomic_write(model, data)


def rollback(model: Path) -> None:
    """Put `model`.prev back; the file it replaces becomes the new .prev (a second rollback undoes)."""
    prev = previous_path(model)
    if not prev.is_file():
        raise FileNotFoundError(f"{prev}: no previous model to roll back to")
    old, cur = prev.read_bytes(), model.read_bytes()
    load_model(str(prev))  # refuse to roll back to a file the server could not load
    atomic_write(model, old)
    atomic_write(prev, cur)


@contextlib.contextmanager
def exclusive(model: Path) -> Iterator[None]:
    """One learn or rollback per model file at a time (a lock file beside it)."""
    lock = model.with_name(model.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{lock}: another learn or rollback is running") from None
        yield
    finally:
        os.close(fd)


def signal_pidfile(pidfile: Path) -> int:
    """SIGHUP the server whose pid is in `pidfile` (it reloads the model between batches)."""
    pid = int(pidfile.read_text().split()[0])
    os.kill(pid, signal.SIGHUP)
    return pid


__all__ = [
    "CANARY_DIR",
    "Decision",
    "Figures",
    "GateConfig",
    "agreement",
    "atomic_write",
    "decide",
    "exclusive",
    "figures",
    "load_canary",
    "previous_path",
    "promote",
    "rollback",
    "signal_pidfile",
]
