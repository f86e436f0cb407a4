"""CPU cost of shadow mode (classifier.shadow_model_path) in the inference work.

  PYTHONPATH=. .venv/bin/python bench/shadow_cost.py [-n 4000] [--rounds 3]

The bundled model alone, then with itself as the shadow, on the first N
trainable corpus messages in batches of 8 (the work one inference process
does per batch: features, model, overrides). Thread CPU per message, rounds
alternating, so the two rows of a round share the machine's state.
Results: bench/results/shadow_cost.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import default_recipe as dr  # noqa: E402

from classifier.inference import classify_batch, labels_of, load_and_warm, load_onnx_model  # noqa: E402

MODEL = str(ROOT / "models/default.onnx")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    raws = [m.raw for m in dr.load_all(progress=False).trainable[: args.n]]
    models = {
        "serving model alone": load_and_warm(MODEL, "cpu", 0, 1, load_onnx_model)[0],
        "with a shadow": load_and_warm(MODEL, "cpu", 0, 1, load_onnx_model, MODEL)[0],
    }
    for r in range(args.rounds):
        for name, model in models.items():
            t0, features, rest = time.thread_time(), 0.0, 0.0
            for i in range(0, len(raws), args.batch):
                _, timing = classify_batch(model, raws[i : i + args.batch], overrides=True,
                                           labels=labels_of(model))  # fmt: skip
                features += timing.features_cpu_s
                rest += timing.model_cpu_s
            per = 1e6 / len(raws)
            print(f"round {r + 1}  {name:20s} {(time.thread_time() - t0) * per:6.1f} us/msg "
                  f"(features {features * per:5.1f}, model and overrides {rest * per:5.1f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
