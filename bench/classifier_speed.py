"""Classifier speed on ONE core: features, inference, and `triaged evaluate` end to end.

  .venv/bin/python bench/classifier_speed.py [--repeat 3] [--out bench/results]

Pins itself to one CPU (sched_setaffinity) with onnxruntime at one thread, reads
the whole SpamAssassin corpus into memory first (disk is not what is measured),
then reports medians of --repeat runs for:
- features, one message per call (`extract`, the service's path);
- features, batched (`extract_many`, the evaluate path);
- inference only, fp32 and int8, batches of 256;
- end to end as `triaged evaluate` does it (features + batched inference), fp32 and int8,
  with the spam F1 and category macro-F1 of each (int8 vs fp32 accuracy).

--baseline FILE (an older classifier/features.py, e.g. from `git show REV:classifier/features.py`)
adds the batched-features and evaluate figures of that extractor, measured in the
same process with each repeat run back to back with the current one: on a shared
machine the load moves by 30% between separate runs, and pairs see the same load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import classifier.model  # noqa: E402
from classifier.evaluate import compute_report, predict_messages  # noqa: E402
from classifier.features import extract, extract_many  # noqa: E402
from classifier.labels import SA_SPAM_GROUPS  # noqa: E402
from classifier.model import load_model  # noqa: E402

CORPUS = ROOT / "data-cache/spamassassin/package/data"


def _median_rate(n: int, fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


_KEEP = "<!-- Kept by bench/classifier_speed.py: everything below is not regenerated. -->"


def _load_baseline(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_features", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _paired(n: int, runs: dict[str, Callable[[], float | None]], repeat: int) -> dict[str, float]:
    """messages/s of each run, median of `repeat` rounds, the runs of a round back to back.

    A run returns its own seconds, or None to be timed whole."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            t = time.perf_counter()
            own = fn()
            times[k].append(own if own is not None else time.perf_counter() - t)
    return {k: n / statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--label", default="", help="where it ran, for the record")
    ap.add_argument("--baseline", default="", help="an older features.py to compare with")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})

    # The raw files, as `triaged evaluate` reads them (each one message).
    msgs = [(f.parent.name, f.read_bytes()) for f in sorted(CORPUS.glob("*/*.txt"))]
    raws = [r for _, r in msgs]
    n = len(raws)
    fp32 = load_model(str(ROOT / "models/default.onnx"), intra_op_num_threads=1)
    int8 = load_model(str(ROOT / "models/default-int8.onnx"), intra_op_num_threads=1)
    params = fp32.manifest.features
    res: dict[str, object] = {
        "messages": n,
        "cpu": platform.processor() or platform.machine(),
        "where": args.label,
        "cores_used": 1,
        "repeat": args.repeat,
        "model": fp32.name_version,
        # The machine may be shared: the load says how much to trust the figures.
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    res["features_single_msg_per_s"] = round(
        _median_rate(n, lambda: [extract(r, params) for r in raws], args.repeat)
    )
    res["features_batched_msg_per_s"] = round(
        _median_rate(
            n,
            lambda: [extract_many(raws[i : i + 256], params) for i in range(0, n, 256)],
            args.repeat,
        )
    )
    feats = [a for i in range(0, n, 256) for a in extract_many(raws[i : i + 256], params)]
    feats.sort(key=len)  # as evaluate batches them: similar lengths, little padding
    for name, model in (("fp32", fp32), ("int8", int8)):
        res[f"inference_{name}_msg_per_s"] = round(
            _median_rate(
                n,
                lambda m=model: [m.run(feats[i : i + 256]) for i in range(0, n, 256)],
                args.repeat,
            )
        )
        rates = []
        # predict_messages: features (batched hashing), batches of similar length, one run each.
        for _ in range(args.repeat):
            cats, _, spams, _, elapsed = predict_messages(model, raws, 256)
            rates.append(n / elapsed)
        truth = [g in SA_SPAM_GROUPS for g, _ in msgs]
        rep = compute_report(model.manifest.labels, [None] * n, cats, truth, spams)
        res[f"evaluate_{name}_msg_per_s"] = round(statistics.median(rates))
        res[f"evaluate_{name}_spam_f1_whole_corpus"] = rep.spam_f1
    agree = sum(
        a.category == b.category
        for a, b in zip(fp32.predict(feats[:2000]), int8.predict(feats[:2000]), strict=True)
    )
    res["int8_fp32_category_agreement_first_2000"] = round(agree / min(n, 2000), 4)
    if args.baseline:
        base = _load_baseline(args.baseline)
        # The model module's own name for the extractor: swapped per evaluate run.
        model_ns = vars(classifier.model)
        current = model_ns["extract_many"]

        def batched(fn: Callable[..., Any]) -> Callable[[], None]:
            def go() -> None:
                for i in range(0, n, 256):
                    fn(raws[i : i + 256], params)

            return go

        def evaluate(fn: Callable[..., Any]) -> Callable[[], float]:
            def go() -> float:
                model_ns["extract_many"] = fn
                try:
                    return predict_messages(fp32, raws, 256)[4]
                finally:
                    model_ns["extract_many"] = current

            return go

        same = all(
            (a == b).all()
            for a, b in zip(
                base.extract_many(raws, params), extract_many(raws, params), strict=True
            )
        )
        res["paired_same_ids_as_baseline"] = same
        paired = _paired(
            n,
            {
                "paired_features_batched_baseline": batched(base.extract_many),
                "paired_features_batched_current": batched(extract_many),
                "paired_evaluate_fp32_baseline": evaluate(base.extract_many),
                "paired_evaluate_fp32_current": evaluate(extract_many),
            },
            args.repeat,
        )
        res["baseline"] = args.baseline
        res.update({f"{k}_msg_per_s": round(v) for k, v in paired.items()})
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Earlier records (other machines) live under "kept" and below the marker
    # in the .md: a rerun replaces only this machine's figures.
    old_json = out / "classifier_speed.json"
    kept = json.loads(old_json.read_text()).get("kept", {}) if old_json.exists() else {}
    (out / "classifier_speed.json").write_text(json.dumps({**res, "kept": kept}, indent=1) + "\n")
    old_md = out / "classifier_speed.md"
    tail = old_md.read_text().partition(_KEEP)[2] if old_md.exists() else ""
    lines = [
        "# Classifier speed (one core)",
        "",
        f"`.venv/bin/python {' '.join(sys.argv)}` — {res['where'] or 'this machine'}, {n} SpamAssassin messages held in memory, "
        f"one CPU (sched_setaffinity), onnxruntime intra-op threads 1, median of {args.repeat}; "
        f"load average {res['loadavg_start']} at start, {res['loadavg_end']} at end.",
        "",
        "| what | messages/s |",
        "|---|---|",
    ]
    for k, v in res.items():
        if k.endswith("_msg_per_s"):
            lines.append(f"| {k.removesuffix('_msg_per_s').replace('_', ' ')} | {v:,} |")
    lines += [
        "",
        f"Spam F1 over the whole corpus (training data included, so not a quality figure; it shows int8 = fp32): "
        f"fp32 {res['evaluate_fp32_spam_f1_whole_corpus']}, int8 {res['evaluate_int8_spam_f1_whole_corpus']}; "
        f"category agreement int8 vs fp32: {res['int8_fp32_category_agreement_first_2000']}.",
    ]
    if tail:
        lines += ["", _KEEP + tail.rstrip("\n")]
    (out / "classifier_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
