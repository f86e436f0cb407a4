"""`triaged train | evaluate | classify`: the classifier's command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def add_subcommands(sub: Any) -> None:
    """Register the classifier's subcommands on the `triaged` parser."""
    p = sub.add_parser(
        "train",
        help="train a model from DATA_DIR/<category>/ folders (Maildir, mbox, .eml)",
        description="Train a model. DATA_DIR holds one subfolder per category; the spam "
        "folder trains the spam head only. A hash-chosen 10%% is kept for validation.",
    )
    p.add_argument("data_dir")
    p.add_argument("--out", required=True, help="output .onnx (an -int8 twin is written beside it)")
    p.add_argument("--spam-folder", default="spam")
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--version", default="1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--buckets", type=int, default=1 << 16, help="hashed token buckets")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 variant")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="per-class P/R/F1, confusion matrix, spam P/R, speed")
    p.add_argument("model")
    p.add_argument("data_dir")
    p.add_argument("--spam-folder", default="spam")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("classify", help="classify messages: files, mboxes, Maildirs")
    p.add_argument("model")
    p.add_argument(
        "inputs", nargs="*", help="files, mboxes, Maildirs (default: one message on stdin)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--shadow", metavar="CANDIDATE",
                   help="also classify with CANDIDATE (e.g. MODEL.candidate of `triaged learn "
                   "--no-promote`) and say where it differs: shadow mode, offline")  # fmt: skip
    p.set_defaults(func=_classify)


def _train(args: argparse.Namespace) -> int:
    from classifier.features import FeatureParams
    from classifier.train import TrainConfig, print_validation, train_dir

    cfg = TrainConfig(dim=args.dim, epochs=args.epochs, seed=args.seed)
    try:
        result, paths = train_dir(
            args.data_dir,
            args.out,
            spam_folder=args.spam_folder,
            cfg=cfg,
            params=FeatureParams(buckets=args.buckets),
            name=args.name,
            version=args.version,
            int8=not args.no_int8,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"triaged train: {exc}", file=sys.stderr)
        return 2
    s = result.summary
    print(f"trained on {s['messages']} messages: {s['categories']}, spam {s['spam']}")
    print_validation(result)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _load(path: str) -> Any:
    from classifier.model import ModelError, load_model

    try:
        return load_model(path)
    except ModelError as exc:
        print(f"triaged: {exc}", file=sys.stderr)
        return None


def _evaluate(args: argparse.Namespace) -> int:
    from classifier.corpus import load_dir
    from classifier.evaluate import evaluate_messages, format_report, report_dict

    model = _load(args.model)
    if model is None:
        return 2
    try:
        messages = load_dir(args.data_dir, spam_folder=args.spam_folder)
    except FileNotFoundError as exc:
        print(f"triaged evaluate: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(
        {m.category for m in messages if m.category and m.category not in model.manifest.labels}
    )
    report = evaluate_messages(model, messages, batch_size=args.batch_size)
    if args.json:
        out = report_dict(report)
        out["model"] = model.name_version
        out["unknown_categories"] = unknown
        print(json.dumps(out))
    else:
        print(format_report(report, f"{model.name_version} on {args.data_dir}"))
        if unknown:
            print(f"folders the model has no category for (not scored): {', '.join(unknown)}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    from classifier.corpus import iter_inputs

    model = _load(args.model)
    if model is None:
        return 2
    if args.shadow:
        from classifier.shadow import ShadowedModel
        from classifier.types import ClassifierError

        shadow = _load(args.shadow)
        if shadow is None:
            return 2
        try:
            model = ShadowedModel(model, shadow, args.shadow)
        except ClassifierError as exc:
            print(f"triaged: {exc}", file=sys.stderr)
            return 2
    items = iter_inputs(args.inputs) if args.inputs else iter([("-", sys.stdin.buffer.read())])
    batch: list[tuple[str, Any]] = []
    differ = Counter[str]()
    for ident, raw in items:
        batch.append((ident, model.featurize(raw)))
        if len(batch) >= 256:
            _print_batch(model, batch, args.json, differ)
    _print_batch(model, batch, args.json, differ)
    if args.shadow:
        n = differ["messages"]
        print(f"{n} messages: {args.shadow} files {differ['category']} elsewhere"
              f" ({differ['category'] / max(n, 1):.1%}) and decides spam otherwise on"
              f" {differ['spam']} ({differ['spam'] / max(n, 1):.1%})", file=sys.stderr)  # fmt: skip
    return 0


def _print_batch(model: Any, batch: list[tuple[str, Any]], as_json: bool,
                 differ: Counter[str]) -> None:  # fmt: skip
    """One line per message; the batch is predicted in one call and emptied.
    With a shadow: its verdict too, and `differ` counts where it disagrees."""
    for (ident, _), c in zip(batch, model.predict([ids for _, ids in batch]), strict=True):
        name = ident if as_json else (Path(ident).name if ident != "-" else "-")
        s = c.shadow
        if s is not None:
            differ.update(["messages"] + ["category"] * (not s.same_category)
                          + ["spam"] * (not s.same_spam))  # fmt: skip
        if as_json:
            doc = {"message": name, "category": c.category, "score": c.score, "spam": c.spam,
                   "spam_score": c.spam_score, "model": c.model}  # fmt: skip
            if s is not None:
                doc |= {"shadow_model": s.model, "shadow_category": s.category, "shadow_spam": s.spam}
            print(json.dumps(doc))
        else:
            line = f"{name}\t{c.category}\t{c.score:.3f}\t{'spam' if c.spam else 'ham'}\t{c.spam_score:.3f}"
            if s is not None:
                line += f"\t{s.category}\t{'spam' if s.spam else 'ham'}"
            print(line)
    batch.clear()


__all__ = ["add_subcommands"]
