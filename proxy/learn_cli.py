"""`triaged learn` and `triaged rollback`: retrain from feedback, gate, swap; undo.

Lives in `proxy` because it reads the whole config (`[learning]`, the
classifier's model path); the work is in `classifier.learning` (learn, gate).

Exit status of learn: 0 when a decision was taken (promoted or refused: the
report and the log line say which; a refusal is the gate working, not a
failure) or when `learning.enabled` is false under --config; 2 on an error
(no torch, bad model file, empty store, another learn running); 78 bad config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from proxy.settings import EX_CONFIG, load_settings

log = structlog.get_logger("triaged.learn")


def candidate_path(model: Path) -> Path:
    """Where `learn` writes its candidate and `promote` takes it from."""
    return model.with_name(model.name + ".candidate")


def report_path(model: Path) -> Path:
    """The learn report: the gate's decision and both models' figures."""
    return model.with_name(model.name + ".learn.json")


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(
        "learn",
        help="train a candidate from the current model and the users' feedback; gate; swap",
        description="Warm-start a candidate from the model on the feedback store, compare it "
        "with the model on a held-out slice of the feedback and on the canary set, and replace "
        "the model file (keeping MODEL.prev) only if it is better. Needs the `train` extra "
        "(torch, onnx). With --config, does nothing unless learning.enabled is true.",
    )
    p.add_argument("--config", help="triaged TOML config (learning.*, classifier.model_path)")
    p.add_argument("--model", help="the fp32 model file (default: classifier.model_path)")
    p.add_argument("--store", help="the feedback store directory (default: learning.store_path)")
    p.add_argument("--out", help="candidate file (default: MODEL.candidate)")
    p.add_argument("--report", help="JSON report (default: MODEL.learn.json)")
    p.add_argument("--canary", help="canary folder <category>/*.eml (default: models/canary)")
    p.add_argument("--replay", help="replay sample (default: learning.replay_path, else "
                   "MODEL.replay.npz beside the model, else the bundled one)")
    p.add_argument("--no-replay", action="store_true",
                   help="learn from the feedback alone (forgets more: bench/results/learning_curve.md)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--anchor", type=float, default=None,
                   help="L2 pull toward the current weights: higher forgets less, learns less")  # fmt: skip
    p.add_argument("--min-holdout", type=int, default=10)
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of the feedback (by body hash) held out for the gate, never trained on")
    p.add_argument("--min-gain", type=float, default=0.01)
    p.add_argument("--canary-margin", type=float, default=0.05)
    p.add_argument("--min-fit", type=float, default=0.75,
                   help="the candidate must agree with this share of the feedback it was trained on")
    p.add_argument("--no-promote", action="store_true", help="gate only, leave MODEL alone")
    p.add_argument("--pidfile", help="SIGHUP this server after a promotion")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_learn)

    p = sub.add_parser(
        "promote",
        help="make the candidate of `triaged learn --no-promote` the model (after shadow mode)",
        description="Replace the model file with the candidate (keeping MODEL.prev), the way "
        "`triaged learn` promotes: for a candidate first run beside the model in shadow mode "
        "(classifier.shadow_model_path). Only a candidate the gate accepted, as its learn "
        "report says, unless --force.",
    )
    p.add_argument("--config", help="triaged TOML config (classifier.model_path)")
    p.add_argument("--model", help="the model file (default: classifier.model_path)")
    p.add_argument("--candidate", help="candidate file (default: MODEL.candidate)")
    p.add_argument("--report", help="learn report saying the gate's decision (default: MODEL.learn.json)")
    p.add_argument("--force", action="store_true", help="promote without the gate's acceptance")
    p.add_argument("--pidfile", help="SIGHUP this server afterwards")
    p.set_defaults(func=_promote)

    p = sub.add_parser("rollback", help="put MODEL.prev back (a second rollback undoes it)")
    p.add_argument("--config", help="triaged TOML config (classifier.model_path)")
    p.add_argument("--model", help="the model file (default: classifier.model_path)")
    p.add_argument("--pidfile", help="SIGHUP this server afterwards")
    p.set_defaults(func=_rollback)


def _learn(args: argparse.Namespace) -> int:
    from classifier.learning import gate, replay
    from classifier.learning.learn import LearnConfig, TorchMissing, learn, write_candidate
    from classifier.learning.store import FeedbackStore, StoreError
    from classifier.model import ModelError, load_model
    from proxy.settings import ConfigError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"triaged learn: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.config and not settings.learning.enabled:
        log.info("learn_disabled", config=args.config)
        print("triaged learn: learning.enabled is false in the config: nothing to do")
        return 0
    model = Path(args.model or settings.classifier.model_path)
    out = Path(args.out) if args.out else candidate_path(model)
    report = Path(args.report) if args.report else report_path(model)
    if not 0.0 < args.holdout_fraction < 1.0:
        print("triaged learn: --holdout-fraction must be between 0 and 1", file=sys.stderr)
        return 2
    cfg = LearnConfig(seed=args.seed, epochs=args.epochs, holdout_fraction=args.holdout_fraction)
    if args.anchor is not None:
        cfg = msgspec.structs.replace(cfg, anchor=args.anchor)
    gcfg = gate.GateConfig(min_holdout=args.min_holdout, min_gain=args.min_gain,
                           canary_margin=args.canary_margin, min_fit=args.min_fit)  # fmt: skip
    store = FeedbackStore(Path(args.store or settings.learning.store_path),
                          max_items=settings.learning.max_items,
                          retention_days=settings.learning.retention_days)  # fmt: skip
    explicit = args.replay or settings.learning.replay_path
    sample: Path | None = None
    if explicit and not args.no_replay:
        sample = Path(explicit)  # missing or for other features: learn refuses (ReplayError)
    elif not args.no_replay:
        sample = replay.find_sample(model)
        if sample is None:  # learn still works, it forgets more: say so
            log.warning("learn_without_replay", model=str(model),
                        expected=str(replay.beside(model)))  # fmt: skip
    try:
        with gate.exclusive(model):
            items = store.items()
            if not items:  # a quiet night is not a failure of the timer's unit
                print(f"triaged learn: {store.path}: no feedback yet, nothing to learn")
                return 0
            result = learn(model, items, cfg, replay=sample,
                           progress=not args.quiet and sys.stderr.isatty())  # fmt: skip
            write_candidate(result, out)
            current, candidate = load_model(str(model)), load_model(str(out))
            canary = gate.load_canary(Path(args.canary) if args.canary else gate.CANARY_DIR)
            decision = gate.decide(current, candidate, result.holdout, canary, gcfg, result.trained)
            # Without auto_promote the candidate waits for `triaged promote` (shadow mode).
            promoted = decision.accepted and not args.no_promote and settings.learning.auto_promote
            if promoted:
                gate.promote(out, model)
            doc = {**msgspec.to_builtins(decision), "promoted": promoted, "model_file": str(model),
                   "candidate_file": str(out), "learn": result.summary}  # fmt: skip
            gate.atomic_write(report, json.dumps(doc, indent=2).encode() + b"\n")
    except (TorchMissing, ModelError, StoreError, ValueError, RuntimeError, OSError) as exc:
        # ReplayError is a ValueError: a sample for other features is refused here
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


def _promote(args: argparse.Namespace) -> int:
    from classifier.learning import gate
    from classifier.model import ModelError, load_model
    from proxy.settings import ConfigError

    try:
        model = Path(args.model or load_settings(args.config).classifier.model_path)
        candidate = Path(args.candidate) if args.candidate else candidate_path(model)
        report = Path(args.report) if args.report else report_path(model)
        with gate.exclusive(model):
            refusal = None if args.force else _gate_refusal(report, candidate)
            if refusal:
                print(f"triaged promote: {refusal} (--force promotes anyway)", file=sys.stderr)
                return 2
            load_model(str(candidate))  # never promote a file the server could not load
            gate.promote(candidate, model)
        if args.pidfile:
            gate.signal_pidfile(Path(args.pidfile))
    except ConfigError as exc:
        print(f"triaged promote: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"triaged promote: {exc}", file=sys.stderr)
        return 2
    log.info("model_promoted", model=str(model), candidate=str(candidate), forced=args.force)
    return 0


def _gate_refusal(report: Path, candidate: Path) -> str | None:
    """Why the learn report does not vouch for `candidate`; None when it does."""
    try:
        doc = json.loads(report.read_text())
    except FileNotFoundError:
        return f"{report}: no learn report, so no gate decision for {candidate}"
    except (OSError, ValueError) as exc:
        return f"{report}: unreadable learn report ({exc})"
    if Path(str(doc.get("candidate_file", ""))).resolve() != candidate.resolve():
        return f"{report} is about {doc.get('candidate_file')!r}, not {str(candidate)!r}"
    if doc.get("accepted") is not True:
        return f"the gate refused {candidate}: {'; '.join(doc.get('reasons') or ['no reason recorded'])}"
    return None


def _rollback(args: argparse.Namespace) -> int:
    from classifier.learning import gate
    from classifier.model import ModelError
    from proxy.settings import ConfigError

    try:
        model = Path(args.model or load_settings(args.config).classifier.model_path)
        with gate.exclusive(model):
            gate.rollback(model)
        if args.pidfile:
            gate.signal_pidfile(Path(args.pidfile))
    except ConfigError as exc:
        print(f"triaged rollback: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (ModelError, RuntimeError, OSError, ValueError) as exc:
        print(f"triaged rollback: {exc}", file=sys.stderr)
        return 2
    log.info("model_rolled_back", model=str(model))
    return 0


__all__ = ["add_subcommands"]
