"""Digest of the feature ids of every local corpus message: proves a speed-up changed no id.

  .venv/bin/python bench/feature_ids_digest.py [--out FILE]

Runs `extract` (one call per message) and `extract_many` (batches of 256) over
the SpamAssassin corpus, the unpacked sets under data-cache/shared, and
deterministic variants of each message (CRLF line ends; truncated at 1/3 and
2/3) so edge paths are covered too. Prints one SHA-256 per set; --out writes
one line per message (set, ident, digest) to diff two runs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classifier.corpus import iter_path  # noqa: E402
from classifier.features import FeatureParams, extract, extract_many  # noqa: E402


def _messages() -> list[tuple[str, bytes]]:
    out = list(iter_path(ROOT / "data-cache/spamassassin/package/data"))
    out += list(iter_path(ROOT / "data-cache/shared"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    p = FeatureParams()
    msgs = _messages()
    variants = {
        "raw": msgs,
        "crlf": [(i, r.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) for i, r in msgs],
        "cut1": [(i, r[: len(r) // 3]) for i, r in msgs],
        "cut2": [(i, r[: 2 * len(r) // 3]) for i, r in msgs],
    }
    lines = []
    for name, items in variants.items():
        raws = [r for _, r in items]
        single = [extract(r, p) for r in raws]
        batched = [a for i in range(0, len(raws), 256) for a in extract_many(raws[i : i + 256], p)]
        total = hashlib.sha256()
        for (ident, _), a, b in zip(items, single, batched, strict=True):
            if not (a.shape == b.shape and (a == b).all()):
                print(f"single != batched: {name} {ident}")
            d = hashlib.sha256(a.tobytes()).hexdigest()[:16]
            total.update(d.encode())
            lines.append(f"{name} {ident} {d}")
        print(f"{name}: {len(items)} messages {total.hexdigest()}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
