"""`triaged learn` and `triaged rollback`: retrain from feedback, gate, swap; undo.

Exit status of learn: 0 when a decision was taken (promoted or refused: the
report says which; a refusal is the gate working, not a failure), 2 on an
error (no torch, bad model file, empty store, another learn running).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

log = structlog.get_logger("triaged.learn")


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(
        "learn",
        help="train a candidate from the current model and the users' feedback; gate; swap",
        description="Warm-start a candidate from MODEL on the feedback store, compare it with "
        "MODEL on a held-out slice of the feedback and on the canary set, and replace MODEL "
        "(keeping MODEL.prev) only if it is better. Needs the `train` extra (torch, onnx).",
    )
    p.add_argument("--model", required=True, help="the fp32 model file the server runs")
    p.add_argument("--store", required=True, help="the feedback store (triaged feedback)")
    p.add_argument("--out", help="candidate file (default: MODEL.candidate)")
    p.add_argument("--report", help="JSON report (default: MODEL.learn.json)")
    p.add_argument("--canary", help="canary folder <category>/*.eml (default: models/canary)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--min-holdout", type=int, default=10)
    p.add_argument("--min-gain", type=float, default=0.01)
    p.add_argument("--canary-margin", type=float, default=0.05)
    p.add_argument("--no-promote", action="store_true", help="gate only, leave MODEL alone")
    p.add_argument("--pidfile", help="SIGHUP this server after a promotion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_learn)

    p = sub.add_parser("rollback", help="put MODEL.prev back (a second rollback undoes it)")
    p.add_argument("--model", required=True)
    p.add_argument("--pidfile", help="SIGHUP this server afterwards")
    p.set_defaults(func=_rollback)


def _items(store: str) -> list[Any]:
    # The store module comes from the feedback half of issue 12.
    mod = importlib.import_module("classifier.learning.store")
    items: list[Any] = mod.FeedbackStore(Path(store)).items()
    return items


def _learn(args: argparse.Namespace) -> int:
    from classifier.learning import gate
    from classifier.learning.learn import LearnConfig, TorchMissing, learn, write_candidate
    from classifier.model import ModelError, load_model

    model = Path(args.model)
    out = Path(args.out) if args.out else model.with_name(model.name + ".candidate")
    report = Path(args.report) if args.report else model.with_name(model.name + ".learn.json")
    cfg = LearnConfig(seed=args.seed, epochs=args.epochs)
    gcfg = gate.GateConfig(min_holdout=args.min_holdout, min_gain=args.min_gain,
                           canary_margin=args.canary_margin)  # fmt: skip
    try:
        with gate.exclusive(model):
            items = _items(args.store)
            result = learn(model, items, cfg, progress=not args.quiet and sys.stderr.isatty())
            write_candidate(result, out)
            current, candidate = load_model(str(model)), load_model(str(out))
            canary = gate.load_canary(Path(args.canary) if args.canary else gate.CANARY_DIR)
            decision = gate.decide(current, candidate, result.holdout, canary, gcfg)
            promoted = decision.accepted and not args.no_promote
            if promoted:
                gate.promote(out, model)
            doc = {**msgspec.to_builtins(decision), "promoted": promoted, "model": str(model),
                   "candidate": str(out), "learn": result.summary}  # fmt: skip
            gate.atomic_write(report, json.dumps(doc, indent=2).encode() + b"\n")
    except (TorchMissing, ModelError, ValueError, RuntimeError, OSError) as exc:
        print(f"triaged learn: {exc}", file=sys.stderr)
        return 2
    log.info("learn_decision", accepted=decision.accepted, promoted=promoted,
             reasons=decision.reasons, current=msgspec.to_builtins(decision.current),
             candidate=msgspec.to_builtins(decision.candidate), report=str(report))  # fmt: skip
    if promoted and args.pidfile:
        try:
            pid = gate.signal_pidfile(Path(args.pidfile))
        except (OSError, ValueError) as exc:
            print(f"triaged learn: promoted, but no SIGHUP sent: {exc}", file=sys.stderr)
            return 2
        log.info("learn_reload_signalled", pid=pid)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from classifier.learning import gate
    from classifier.model import ModelError

    model = Path(args.model)
    try:
        with gate.exclusive(model):
            gate.rollback(model)
        if args.pidfile:
            gate.signal_pidfile(Path(args.pidfile))
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"triaged rollback: {exc}", file=sys.stderr)
        return 2
    log.info("model_rolled_back", model=str(model))
    return 0


__all__ = ["add_subcommands"]
