"""Learning curve of `triaged learn`: a source the base model never saw, fed N corrections.

  PYTHONPATH=. .venv/bin/python bench/learning_curve.py [--source enron] [--seed 1]

Base: models/default_recipe.py's recipe (FOLD_CFG, the LOSO fold settings)
on every trainable source but SOURCE, and without a 10% hash slice of the
other sources (their held-out eval). SOURCE is split by sender group: 30%
of its senders are the held-out test, the rest is the feedback pool, in Date
order (oldest first). For N in 0, 25, 50, 100, 200, 500 the first N pool
messages become feedback with the source's category as the users' label
(a correction where the base disagreed, else a confirmation; user = the
sender group, so the per-user cap applies), and `learn` (all of it trained
on: holdout_fraction 0) warm-starts from the base, rehearsing the base's
replay sample (made by the recipe's own `replay_sample` from the base's
training set, as `default_recipe.py build` makes the shipped one; --no-replay
leaves it out). Reported: SOURCE's held-out category accuracy and spam
false-positive rate (SOURCE is wanted mail), and macro-F1 (all classes
present, and the recipe's rule: classes with >= 20 messages), accuracy,
per-class figures and spam FP on the other sources' held-out slice.
--oracle adds the reference a site cannot have: the recipe trained from
scratch with the whole pool in its corpus.
Results: bench/results/learning_curve*.{json,md}.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import default_recipe as dr  # noqa: E402

from classifier.corpus import Message  # noqa: E402
from classifier.evaluate import compute_report  # noqa: E402
from classifier.learning.learn import LearnConfig, learn, write_candidate  # noqa: E402
from classifier.learning.replay import save as save_replay  # noqa: E402
from classifier.learning.store import FeedbackItem  # noqa: E402
from classifier.model import LoadedModel, load_model  # noqa: E402
from classifier.train import export, make_manifest, split_by_hash  # noqa: E402

SIZES = (0, 25, 50, 100, 200, 500)



def date_of(m: Message) -> float:
    head = m.raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\n"):
        if line.lower().startswith(b"date:"):
            try:
                d = email.utils.parsedate_to_datetime(line[5:].decode("latin-1").strip())
                return d.timestamp()
            except (TypeError, ValueError, IndexError):
                return 0.0
    return 0.0


def measure(model: LoadedModel, test: list[Message], others: list[Message]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ms in (("source", test), ("others", others)):
        preds = model.predict(model.featurize_many([m.raw for m in ms]))
        r = compute_report(
            model.manifest.labels,
            [m.category for m in ms],
            [p.category for p in preds],
            [m.spam for m in ms],
            [bool(p.spam) for p in preds],
        )
        ham = [bool(p.spam) for m, p in zip(ms, preds, strict=True) if not m.spam]
        out[name] = {
            "messages": len(ms),
            "accuracy": r.accuracy,
            "macro_f1": r.macro_f1,
            "spam_fp_rate": round(float(np.mean(ham)), 4) if ham else None,
            # The default recipe's LOSO rule (dr.MIN_CLASS_SUPPORT): the F1 of a class
            # with 2 messages here (`primary` in the others) is 0.4 or 0.8 by one message.
            "macro_f1_support20": round(float(np.mean(
                [v.f1 for v in r.per_class.values() if v.support >= dr.MIN_CLASS_SUPPORT] or [0])), 4),
            "classes": {c: [v.support, v.precision, v.recall, v.f1] for c, v in r.per_class.items()
                        if v.support},  # [support, precision, recall, F1]
        }  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="enron")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--anchor", type=float, default=LearnConfig().anchor)
    ap.add_argument("--replay-weight", type=float, default=LearnConfig().replay_weight)
    ap.add_argument("--no-replay", action="store_true", help="learn without the replay sample")
    ap.add_argument("--replay-labels", type=float, default=LearnConfig().replay_labels)
    ap.add_argument("--replay-batch", type=int, default=LearnConfig().replay_batch)
    ap.add_argument("--lr", type=float, default=LearnConfig().lr)
    ap.add_argument("--epochs", type=int, default=LearnConfig().epochs)
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--oracle", action="store_true",
                    help="also train the recipe from scratch with the whole pool (a reference)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="feedback counts to run")
    args = ap.parse_args()
    t0 = time.time()
    data = dr.load_all(progress=False)
    src = [m for m in data.trainable if m.source == args.source and m.category]
    if not src:
        print(f"no messages of source {args.source}", file=sys.stderr)
        return 2
    rest = [m for m in data.trainable if m.source != args.source]
    others = [m for m in rest if split_by_hash(m, 0.1, b"curve-others")]
    base_train = [m for m in rest if not split_by_hash(m, 0.1, b"curve-others")]
    test = [m for m in src if dr._hash_unit(m.group, b"curve") < 0.3]
    pool = sorted((m for m in src if dr._hash_unit(m.group, b"curve") >= 0.3), key=date_of)
    fitted = dr.recipe(base_train, data, dr.FOLD_CFG, progress=False)
    work = Path(tempfile.mkdtemp(prefix="learning-curve-"))
    base_path = work / "base.onnx"
    manifest = make_manifest(fitted.result, dr.PARAMS, "curve-base", "1")
    export(fitted.result, manifest, base_path, int8=False)
    base = load_model(str(base_path))
    # The base's replay sample, made as the recipe makes the shipped one (from the
    # base's own training set: never the others' eval slice, never SOURCE).
    replay_path = None if args.no_replay else save_replay(
        dr.replay_sample(base_train, data, "curve base training set"), work / "base.replay.npz")
    cfg = LearnConfig(seed=args.seed, holdout_fraction=0.0, anchor=args.anchor, lr=args.lr,
                      epochs=args.epochs, replay_weight=args.replay_weight,
                      replay_labels=args.replay_labels, replay_batch=args.replay_batch)  # fmt: skip
    t_base = time.time() - t0
    decided = [p.category for p in base.predict(base.featurize_many([m.raw for m in pool]))]
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        if n > len(pool):
            break
        t1 = time.time()
        if n == 0:
            model = base
        else:
            items = [
                FeedbackItem(m.raw, m.category or "", m.group,
                     "confirmation" if d == m.category else "correction", d, float(k), m.ident,
                     hashlib.sha256(m.raw).hexdigest())
                for k, (m, d) in enumerate(zip(pool[:n], decided[:n], strict=True))
            ]  # fmt: skip
            res = learn(base_path, items, cfg, replay=replay_path)
            model = load_model(str(write_candidate(res, work / f"cand-{n}.onnx")))
        row = {"feedback": n, "corrections": sum(d != m.category for m, d in
                                                 zip(pool[:n], decided[:n], strict=True)),
               **measure(model, test, others), "seconds": round(time.time() - t1, 1)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    oracle = None
    if args.oracle:
        # The reference: the recipe trained from scratch with the whole feedback
        # pool in its corpus (what a learner with the original corpora could do).
        fo = dr.recipe(base_train + pool, data, dr.FOLD_CFG, progress=False)
        export(fo.result, make_manifest(fo.result, dr.PARAMS, "curve-oracle", "1"),
               work / "oracle.onnx", int8=False)  # fmt: skip
        oracle = measure(load_model(str(work / "oracle.onnx")), test, others)
        print(json.dumps({"feedback": "oracle", **oracle}), flush=True)
    doc = {"source": args.source, "oracle": oracle, "seed": args.seed, "config": msgspec.to_builtins(cfg),
           "replay": None if replay_path is None else replay_path.stat().st_size,
           "pool": len(pool), "test": len(test),
           "others": len(others), "base_seconds": round(t_base, 1), "rows": rows,
           "base_training": fitted.result.summary["sources"]}  # fmt: skip
    out = ROOT / "bench/results"
    name = f"learning_curve_{args.source.replace('/', '_')}{args.tag}.json"
    (out / name).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
