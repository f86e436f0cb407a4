"""Learning curve of `triaged learn`: a source the base model never saw, fed N corrections.

  PYTHONPATH=. .venv/bin/python bench/learning_curve.py [--source enron] [--seeds 1,2,3]

Base: models/default_recipe.py's recipe (FOLD_CFG, the LOSO fold settings)
on every trainable source but SOURCE, and without a hash slice
(--others-fraction, 10%) of the other sources (their held-out eval). SOURCE
is split by sender group: 30% of its senders are the held-out test, the rest
is the feedback stream, in Date order (oldest first), labelled with the
source's category (the users' label; user = the sender group, so the
per-user cap applies). A stream message is a correction where the base's
verdict differs from the label (another category, or spam), else a
confirmation. The x axis counts corrections, as issue 12 asks: point C feeds
the shortest prefix of the stream that holds C corrections, with the
confirmations that came along in it (the row says how many feedback messages
in all). For each point and each learning seed, `learn` (all of it trained
on: holdout_fraction 0) warm-starts from the base, rehearsing the base's
replay sample (made by the recipe's own `replay_sample` from the base's
training set, as `default_recipe.py build` makes the shipped one; --no-replay
leaves it out). Reported: SOURCE's held-out category accuracy and spam
false-positive rate (SOURCE is wanted mail), and on the other sources'
held-out slice macro-F1 over all classes present (the issue's figure) and
over classes with >= 20 messages (the recipe's MIN_CLASS_SUPPORT rule),
accuracy, per-class figures, per-source accuracy and spam FP, and which
messages changed category.
--oracle adds the reference a site cannot have: the recipe trained from
scratch with the whole stream in its corpus.
The base and its replay sample are cached in --work (rebuilt when absent).
Results: bench/results/learning_curve*.{json,md}.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import sys
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
from classifier.features import IdArray  # noqa: E402
from classifier.learning.learn import LearnConfig, learn, write_candidate  # noqa: E402
from classifier.learning.replay import save as save_replay  # noqa: E402
from classifier.learning.store import FeedbackItem  # noqa: E402
from classifier.model import LoadedModel, load_model  # noqa: E402
from classifier.train import export, make_manifest, split_by_hash  # noqa: E402

CORRECTIONS = (0, 25, 50, 100, 200, 500)


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


def per_source(ms: list[Message], preds: list[Any]) -> dict[str, list[Any]]:
    """Per source of the slice: [messages, category accuracy, spam FP rate]. A
    source is one kind of mail, so each sees whether learning cost it anything."""
    out: dict[str, list[Any]] = {}
    for src in sorted({m.source for m in ms}):
        pairs = [(m, p) for m, p in zip(ms, preds, strict=True) if m.source == src]
        cats = [m.category == p.category for m, p in pairs if m.category]
        ham = [bool(p.spam) for m, p in pairs if not m.spam]
        out[src] = [len(pairs), round(float(np.mean(cats)), 4) if cats else None,
                    round(float(np.mean(ham)), 4) if ham else None]  # fmt: skip
    return out


def measure(model: LoadedModel, sets: dict[str, tuple[list[Message], list[IdArray]]],
            base_cats: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for name, (ms, ids) in sets.items():
        preds = model.predict(ids)
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
            "sources": per_source(ms, preds),
        }  # fmt: skip
        if base_cats is not None:  # what the candidate files differently from the base
            out[name]["changed"] = [
                [m.ident, m.category, b, p.category]
                for m, b, p in zip(ms, base_cats[name], preds, strict=True)
                if m.category and b != p.category
            ]
    return out


class Setup(msgspec.Struct):
    data: Any  # dr.Data
    base_train: list[Message]
    test: list[Message]
    others: list[Message]
    stream: list[Message]  # the feedback pool, in Date order


def setup(source: str, others_fraction: float) -> Setup:
    data = dr.load_all(progress=False)
    src = [m for m in data.trainable if m.source == source and m.category]
    rest = [m for m in data.trainable if m.source != source]
    held = [split_by_hash(m, others_fraction, b"curve-others") for m in rest]
    others = [m for m, h in zip(rest, held, strict=True) if h]
    base_train = [m for m, h in zip(rest, held, strict=True) if not h]
    test = [m for m in src if dr._hash_unit(m.group, b"curve") < 0.3]
    stream = sorted((m for m in src if dr._hash_unit(m.group, b"curve") >= 0.3), key=date_of)
    return Setup(data, base_train, test, others, stream)


def base_model(s: Setup, work: Path, no_replay: bool) -> tuple[Path, Path | None, float]:
    """(base model, its replay sample, seconds): built once per --work folder."""
    t0 = time.time()
    base_path, replay_path = work / "base.onnx", work / "base.replay.npz"
    if not base_path.is_file():
        fitted = dr.recipe(s.base_train, s.data, dr.FOLD_CFG, progress=False)
        manifest = make_manifest(fitted.result, dr.PARAMS, "curve-base", "1")
        export(fitted.result, manifest, base_path, int8=False)
    if not replay_path.is_file():
        # Made as the recipe makes the shipped one (from the base's own training
        # set: never the others' eval slice, never SOURCE).
        save_replay(dr.replay_sample(s.base_train, s.data, "curve base training set"), replay_path)
    return base_path, None if no_replay else replay_path, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="enron")
    ap.add_argument("--seeds", default="1,2,3", help="learning seeds, each run at every point")
    ap.add_argument("--corrections", default=",".join(map(str, CORRECTIONS)),
                    help="points of the curve, in corrections")  # fmt: skip
    ap.add_argument("--others-fraction", type=float, default=0.1,
                    help="hash slice of the other sources held out of the base as their eval")
    ap.add_argument("--no-replay", action="store_true", help="learn without the replay sample")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a LearnConfig field other than the default (repeatable)")
    ap.add_argument("--work", help="folder caching the base model (default: data-cache/...)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--oracle", action="store_true",
                    help="also train the recipe from scratch with the whole stream (a reference)")
    args = ap.parse_args()
    t0 = time.time()
    s = setup(args.source, args.others_fraction)
    if not s.stream:
        print(f"no messages of source {args.source}", file=sys.stderr)
        return 2
    work = Path(args.work or ROOT / "data-cache" / "learning-curve" /
                f"{args.source.replace('/', '_')}-others{args.others_fraction}-v{dr.PARAMS.version}")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    base_path, replay_path, t_base = base_model(s, work, args.no_replay)
    overrides = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.set)}
    base = load_model(str(base_path))
    sets = {"source": (s.test, base.featurize_many([m.raw for m in s.test])),
            "others": (s.others, base.featurize_many([m.raw for m in s.others]))}  # fmt: skip
    base_cats = {k: [p.category for p in base.predict(ids)] for k, (_, ids) in sets.items()}
    preds = base.predict(base.featurize_many([m.raw for m in s.stream]))
    corrected = [p.category != m.category or bool(p.spam) for m, p in zip(s.stream, preds, strict=True)]
    decided = ["spam" if p.spam else p.category for p in preds]
    at = np.cumsum(corrected)  # corrections within the first k+1 stream messages
    base_row = {"corrections": 0, "feedback": 0, **measure(base, sets)}
    print(json.dumps({k: base_row[k] for k in ("corrections", "feedback")} |
                     {k: {m: base_row[k][m] for m in ("accuracy", "spam_fp_rate", "macro_f1")}
                      for k in sets}), flush=True)  # fmt: skip
    rows = []
    for c in [int(x) for x in args.corrections.split(",") if int(x) > 0]:
        if c > int(at[-1]):
            print(f"the stream holds {int(at[-1])} corrections, not {c}", file=sys.stderr)
            c = int(at[-1])
        n = int(np.searchsorted(at, c)) + 1  # the shortest prefix with c corrections
        items = [
            FeedbackItem(m.raw, m.category or "", m.group,
                         "correction" if corr else "confirmation", d, float(k), m.ident,
                         hashlib.sha256(m.raw).hexdigest())
            for k, (m, d, corr) in enumerate(zip(s.stream[:n], decided[:n], corrected[:n], strict=True))
        ]  # fmt: skip
        for seed in [int(x) for x in args.seeds.split(",")]:
            t1 = time.time()
            cfg = msgspec.structs.replace(LearnConfig(), seed=seed, holdout_fraction=0.0, **overrides)
            res = learn(base_path, items, cfg, replay=replay_path)
            model = load_model(str(write_candidate(res, work / f"cand-{c}-{seed}.onnx")))
            row = {"corrections": c, "feedback": n, "seed": seed, **measure(model, sets, base_cats),
                   "seconds": round(time.time() - t1, 1)}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("corrections", "feedback", "seed", "seconds")} |
                             {k: {m: row[k][m] for m in ("accuracy", "spam_fp_rate", "macro_f1",
                                                         "macro_f1_support20")} for k in sets}),
                  flush=True)  # fmt: skip
        if c == int(at[-1]):
            break
    oracle = None
    if args.oracle:
        # The reference: the recipe trained from scratch with the whole stream in its
        # corpus (what a learner with the original corpora could do).
        fo = dr.recipe(s.base_train + s.stream, s.data, dr.FOLD_CFG, progress=False)
        export(fo.result, make_manifest(fo.result, dr.PARAMS, "curve-oracle", "1"),
               work / "oracle.onnx", int8=False)  # fmt: skip
        oracle = measure(load_model(str(work / "oracle.onnx")), sets)
        print(json.dumps({"oracle": {k: oracle[k]["macro_f1"] for k in sets}}), flush=True)
    cfg = msgspec.structs.replace(LearnConfig(), holdout_fraction=0.0, **overrides)
    doc = {"source": args.source, "seeds": args.seeds, "config": msgspec.to_builtins(cfg),
           "replay": None if replay_path is None else replay_path.stat().st_size,
           "stream": len(s.stream), "stream_corrections": int(at[-1]), "test": len(s.test),
           "others": len(s.others), "others_fraction": args.others_fraction,
           "base_seconds": round(t_base, 1), "seconds": round(time.time() - t0, 1),
           "base": base_row, "rows": rows, "oracle": oracle}  # fmt: skip
    out = ROOT / "bench/results"
    name = f"learning_curve_{args.source.replace('/', '_')}{args.tag}.json"
    (out / name).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
