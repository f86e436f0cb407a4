"""SpamAssassin 4.0.1 (offline rules, `spamassassin -L`) vs triaged's spam head, side by side.

  .venv/bin/python bench/spamassassin_compare.py [--workers 2] [--limit N]

Same messages for both: the SpamAssassin-corpus part of the default model's
random held-out split (`models/default_recipe.load_all()["classic_test"]`,
chosen by a hash of each message, never trained or tuned on), spam and ham.

SpamAssassin runs through its own Perl API exactly as `spamassassin -L -t`
sets it up (local tests only, the Debian-shipped rules in
/usr/share/spamassassin since no sa-update rules are installed, Bayes off,
no auto-learn, no auto-welcomelist), one long-lived Perl process per worker
instead of one `spamassassin` start (~1 s) per message. A few messages are
re-scored with the real `spamassassin -L -t` CLI to show the scores agree.
SpamAssassin reads each message's original file; triaged reads the bytes its
evaluation reads (collection leaks stripped; its features never look at
Received lines anyway).

Writes bench/results/spamassassin_vs_triaged.{json,md}. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classifier.corpus import Message  # noqa: E402
from classifier.evaluate import predict_messages  # noqa: E402
from classifier.model import load_model  # noqa: E402

RESULTS = ROOT / "bench/results"
COMMAND = ".venv/bin/python bench/spamassassin_compare.py"

# Mirrors /usr/bin/spamassassin's Mail::SpamAssassin->new() for `-L -x -t`,
# plus `use_bayes 0` so a Bayes database left in $HOME can't score. Reads one
# "index<TAB>path" per line, prints "index<TAB>score<TAB>required<TAB>tests".
# Why fork per message: one engine reused over many messages (as spamd's
# children do) scored some messages differently from the CLI; e.g.
# hard-ham-1/00138.1bf66894... lost GB_CUSTOM_HTM_URI (a 4.0 "capture" rule,
# %{GB_TO_ADDR}) after 400 earlier messages: 1.8 instead of the CLI's 2.8.
_PERL = r"""
use strict; use warnings;
use Mail::SpamAssassin;
my $sa = Mail::SpamAssassin->new({
  local_tests_only => 1, dont_copy_prefs => 1, require_rules => 1,
  post_config_text => "use_bayes 0\nbayes_auto_learn 0\nuse_auto_welcomelist 0\n",
  PREFIX => '/usr', DEF_RULES_DIR => '/usr/share/spamassassin',
  LOCAL_RULES_DIR => '/etc/spamassassin', LOCAL_STATE_DIR => '/var/lib/spamassassin',
});
$sa->init(1);
$sa->{conf}->{use_auto_welcomelist} = 0;
$sa->{conf}->{bayes_auto_learn} = 0;
$| = 1;
while (my $line = <STDIN>) {
  chomp $line;
  my ($i, $path) = split /\t/, $line, 2;
  # A fresh fork of the initialised engine per message: exactly the state the
  # CLI checks its one message in (a reused engine carries state over, below).
  my $pid = open(my $kid, "-|") // die "fork: $!";
  if ($pid == 0) {
    my $out = eval {
      open(my $fh, '<:raw', $path) or die "open: $!";
      local $/; my $data = <$fh>; close $fh;
      my $mail = $sa->parse($data);
      my $st = $sa->check($mail);
      sprintf("%s\t%.3f\t%.1f\t%s", $i, $st->get_score, $st->get_required_score,
              $st->get_names_of_tests_hit);
    };
    if (defined $out) { print "$out\n"; }
    else { my $e = $@; $e =~ s/\s+/ /g; print "$i\tERR\t$e\n"; }
    require POSIX; POSIX::_exit(0);
  }
  my $res = do { local $/; <$kid> };
  close $kid;
  print(defined $res && length $res ? $res : "$i\tERR\tchild died ($?)\n");
}
"""

# What to keep in mind when reading each set's table (markdown bullets).
READING = {
    "classic": """- No network tests (DNSBLs, URIBLs, Razor/Pyzor/DCC) and no Bayes: SpamAssassin
  without them is much weaker than a deployed one, where network tests and a
  trained Bayes carry most of the recall. The rules are those of the Debian 4.0.1 package (2024-25); the
  mail is from 2002, so many of today's rules (DKIM/SPF/DMARC, modern
  phishing) have nothing to fire on. Most hit rules on the spam here: {rules}.
- The corpus IS SpamAssassin's own public corpus: its rule scores were partly
  tuned on it (and on mail like it), which flatters SpamAssassin; triaged was
  trained on the other 80% of the same corpus, which flatters triaged in the
  same way (same collectors, same era). Neither number says how either does
  on today's mail; `make eval`'s modern-mail figures speak to that for triaged.
- SpamAssassin reads each message's original file; triaged reads the bytes its
  own evaluation reads (collection leaks such as X-Keywords and taint.org
  Received lines stripped). SpamAssassin time is wall clock over
  the Perl processes on a 2-core VM shared with other work; triaged's is
  one thread, features plus batched ONNX inference.
""",
    "modern": """- No network tests (DNSBLs, URIBLs, Razor/Pyzor/DCC) and no Bayes: on
  today's phishing those carry most of a deployed SpamAssassin's recall (fresh
  URL and sender reputation); the local rules alone are what an offline filter
  has, the same position as the bundled model. Most hit rules on the spam
  here: {rules}.
- Neither filter trained on phishing-pot. Both are far from the 0.90 recall
  issue 11 asks of the bundled model: the local rules of a mature filter
  catch fewer of these lures than triaged does.
- The ham here is wanted modern mail triaged trained on (its false positives
  on it are optimistic); `make eval` measures triaged's on held-out senders.
- Both read the same bytes (the modern sets are tarballs: each message is
  written to a file for SpamAssassin). phishing-pot's recipients were
  rewritten to `phishing@pot` by its collectors, which is why TO_MALFORMED
  fires on most of it. SpamAssassin time is wall clock over the Perl
  processes on a 2-core VM shared with other work; triaged's is one thread,
  features plus batched ONNX inference.
""",
}  # fmt: skip

SPLITS = {
    "classic": "the SpamAssassin-corpus part of the default model's random held-out split, "
               "models/default_recipe.py load_all().random_test (split_by_hash(m, 0.2, b'test'): "
               "sha256 of the message bytes); never used to train or tune the default model",
    "modern": "phishing-pot (modern phishing from honeypots, 2022-2026; the default model never "
              "trains on it) as spam, and a spread of the modern wanted mail (newsletters, "
              "shipping notices, bounces, list mail) as ham. The default model trained on that "
              "ham, so its false positives there are optimistic (make eval's "
              "heldout_modern_ham_spam_fp_rate is the fair figure); SpamAssassin never saw any",
}  # fmt: skip

_CLI_SCORE = re.compile(rb"Content analysis details:\s+\((-?[0-9.]+) points, ([0-9.]+) required\)")


def held_out() -> list[Message]:
    """The SpamAssassin-corpus part of the recipe's random held-out split."""
    from models.default_recipe import load_all  # the recipe's own split, not a copy

    return [m for m in load_all().random_test if m.source.startswith("sa/")]


def modern_set(ham_n: int) -> list[Message]:
    """phishing-pot (never trained on), then `ham_n` modern wanted messages
    spread over their sources (newsletters, notifications, bounces, lists)."""
    from models.default_recipe import is_modern, load_all

    data = load_all()
    by_source: dict[str, list[Message]] = {}
    for m in data.trainable:
        if is_modern(m) and not m.spam:
            by_source.setdefault(m.source, []).append(m)
    # Every source has its share; a small one (newsletters, shop notices) all of it.
    share = ham_n // max(1, len(by_source))
    ham = [m for ms in by_source.values() for m in ms[:: max(1, len(ms) // share)][:share]]
    return data.phishing + ham


def run_sa(paths: list[Path], workers: int) -> tuple[list[tuple[float, float, str]], float]:
    """(score, required, tests) per path, in order, and the wall seconds."""
    t0 = time.perf_counter()
    procs = []
    for w in range(workers):
        lines = "".join(f"{i}\t{paths[i]}\n" for i in range(w, len(paths), workers))
        p = subprocess.Popen(
            ["perl", "-e", _PERL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # rule-engine warnings about odd mail
            text=True,
        )
        procs.append((p, lines))
    # Feed all stdin first (small), then read: each worker streams independently.
    outs = [p.communicate(lines)[0] for p, lines in procs]
    wall = time.perf_counter() - t0
    res: dict[int, tuple[float, float, str]] = {}
    for out in outs:
        for line in out.splitlines():
            i, score, *rest = line.split("\t")
            if score == "ERR":
                raise RuntimeError(f"SpamAssassin failed on {paths[int(i)]}: {rest}")
            res[int(i)] = (float(score), float(rest[0]), rest[1] if len(rest) > 1 else "")
    missing = [i for i in range(len(paths)) if i not in res]
    if missing:
        raise RuntimeError(f"SpamAssassin gave no result for {len(missing)} messages")
    return [res[i] for i in range(len(paths))], wall


def cli_check(paths: list[Path], scores: list[float]) -> list[dict[str, Any]]:
    """Re-score with the real `spamassassin -L -t` CLI: the driver must agree."""
    out = []
    for path, score in zip(paths, scores, strict=True):
        r = subprocess.run(
            ["spamassassin", "-L", "-t", "-x", "--cf=use_bayes 0", str(path)],
            capture_output=True,
            check=False,
        )
        m = _CLI_SCORE.search(r.stdout)
        cli = float(m.group(1)) if m else None
        out.append({"file": path.name, "driver": round(score, 1), "cli": cli})
    return out


def prf(truth: list[bool], pred: list[bool]) -> dict[str, Any]:
    tp = sum(t and p for t, p in zip(truth, pred, strict=True))
    fp = sum(p and not t for t, p in zip(truth, pred, strict=True))
    fn = sum(t and not p for t, p in zip(truth, pred, strict=True))
    tn = len(truth) - tp - fp - fn
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "fp_rate": round(fp / (fp + tn), 4) if fp + tn else 0.0,
    }  # fmt: skip


def by_source(msgs: list[Message], pred: list[bool]) -> dict[str, str]:
    """Per corpus group: how many were called spam."""
    total: Counter[str] = Counter(m.source for m in msgs)
    hit: Counter[str] = Counter(m.source for m, p in zip(msgs, pred, strict=True) if p)
    return {s: f"{hit[s]}/{total[s]}" for s in sorted(total)}


def best_threshold(truth: list[bool], scores: list[float]) -> tuple[float, dict[str, Any]]:
    """Best-F1 threshold chosen ON THE TEST SET: an optimistic ceiling, not a result."""
    best = (0.0, prf(truth, [s >= 0.0 for s in scores]))
    for t in sorted(set(scores)):
        r = prf(truth, [s >= t for s in scores])
        if r["f1"] > best[1]["f1"]:
            best = (t, r)
    return best


def git_describe() -> str:
    """HEAD, and whether the model or classifier had uncommitted edits when measured."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "models", "classifier")
    return git("rev-parse", "--short", "HEAD") + (
        " + uncommitted models/classifier" if dirty else ""
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N messages only (smoke run)")
    ap.add_argument("--model", default=str(ROOT / "models/default.onnx"))
    ap.add_argument("--cli-checks", type=int, default=6)
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--set", choices=("classic", "modern"), default="classic",
                    help="classic: the SpamAssassin corpus's held-out part; modern: phishing-pot "
                         "and a spread of modern wanted mail (results name ends _modern)")
    ap.add_argument("--ham", type=int, default=400, help="modern wanted messages (--set modern)")
    args = ap.parse_args()
    name = "spamassassin_vs_triaged" + ("_modern" if args.set == "modern" else "")
    if args.render_only:
        r = json.loads((RESULTS / f"{name}.json").read_text())
        (RESULTS / f"{name}.md").write_text(markdown(r))
        return 0

    from models.default_recipe import SA_DIR

    msgs = held_out() if args.set == "classic" else modern_set(args.ham)
    if args.limit:  # smoke run: a spread over the groups, not the first N
        msgs = msgs[:: max(1, len(msgs) // args.limit)][: args.limit]
    truth = [m.spam for m in msgs]
    with tempfile.TemporaryDirectory(prefix="sa-compare-") as tmp:
        if args.set == "classic":
            paths = [SA_DIR / m.ident for m in msgs]
        else:  # the modern sets live in tarballs: SpamAssassin reads the bytes triaged reads
            paths = [Path(tmp) / f"{i}.eml" for i in range(len(msgs))]
            for path, m in zip(paths, msgs, strict=True):
                path.write_bytes(m.raw)
        return compare(args, name, msgs, truth, paths)


def compare(args: argparse.Namespace, name: str, msgs: list[Message], truth: list[bool],
            paths: list[Path]) -> int:
    print(f"{len(msgs)} messages: {dict(Counter(m.source for m in msgs))}")

    model = load_model(args.model)
    _, _, t_spam, t_scores, t_secs = predict_messages(model, (m.raw for m in msgs))
    print(f"triaged: {t_secs:.2f} s (features + batched inference, one thread)")

    sa, sa_secs = run_sa(paths, args.workers)
    sa_scores = [s for s, _, _ in sa]
    required = sa[0][1]
    sa_spam = [s >= required for s in sa_scores]
    print(f"SpamAssassin: {sa_secs:.1f} s wall over {args.workers} processes")

    step = max(1, len(msgs) // max(1, args.cli_checks))
    picks = list(range(0, len(msgs), step))[: args.cli_checks]
    checks = cli_check([paths[i] for i in picks], [sa_scores[i] for i in picks])

    sa_t, sa_best = best_threshold(truth, sa_scores)
    tr_t, tr_best = best_threshold(truth, t_scores)
    rules: Counter[str] = Counter()
    for (_, _, tests), spam in zip(sa, truth, strict=True):
        if spam:
            rules.update(t for t in tests.split(",") if t)
    result: dict[str, Any] = {
        "command": COMMAND + (f" --set modern --ham {args.ham}" if args.set == "modern" else "")
                   + (f" --limit {args.limit}" if args.limit else ""),
        "set": args.set,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "messages": {"n": len(msgs), "spam": sum(truth), "ham": len(truth) - sum(truth),
                     "by_source": dict(Counter(m.source for m in msgs)),
                     "spam_sources": sorted({m.source for m in msgs if m.spam})},
        "split": SPLITS[args.set],
        "spamassassin": {
            "version": subprocess.run(["spamassassin", "-V"], capture_output=True, text=True,
                                      check=False).stdout.split("\n")[0],
            "mode": "local tests only (-L), Debian-shipped rules, Bayes off, no auto-learn",
            "required_score": required,
            **prf(truth, sa_spam),
            "called_spam_by_source": by_source(msgs, sa_spam),
            "seconds_wall": round(sa_secs, 1),
            "workers": args.workers,
            "messages_per_s": round(len(msgs) / sa_secs, 1),
            "best_f1_threshold_on_test": {"threshold": sa_t, **sa_best},
            "top_rules_on_spam": dict(rules.most_common(15)),
            "cli_cross_check": checks,
        },
        "triaged": {
            "model": model.name_version,
            "model_file": {"path": str(Path(args.model).resolve().relative_to(ROOT)),
                           "sha256": hashlib.sha256(Path(args.model).read_bytes()).hexdigest()[:16],
                           "created": model.manifest.created},
            "threshold": model.manifest.spam_threshold,
            **prf(truth, t_spam),
            "called_spam_by_source": by_source(msgs, t_spam),
            "seconds": round(t_secs, 3),
            "threads": 1,
            "messages_per_s": round(len(msgs) / t_secs, 1) if t_secs else None,
            "best_f1_threshold_on_test": {"threshold": tr_t, **tr_best},
        },
        "both": {
            "agree": sum(a == b for a, b in zip(sa_spam, t_spam, strict=True)),
            "sa_only_right": sum(a == t != b for a, b, t in zip(sa_spam, t_spam, truth, strict=True)),
            "triaged_only_right": sum(b == t != a for a, b, t in zip(sa_spam, t_spam, truth, strict=True)),
        },
        "commit": git_describe(),
        "machine": f"{platform.machine()}, {platform.python_version()}, shared 2-core VM",
    }  # fmt: skip
    if not args.limit:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(result))
        print(f"wrote {RESULTS.relative_to(ROOT)}/{name}.{{json,md}}")
    print(json.dumps({k: result[k] for k in ("messages", "both")}))
    for who in ("spamassassin", "triaged"):
        r = result[who]
        print(f"{who}: P={r['precision']} R={r['recall']} F1={r['f1']} FP={r['fp']} FN={r['fn']}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    sa, tr, n = r["spamassassin"], r["triaged"], r["messages"]
    rows = []
    for name, x, t in (
        (f"SpamAssassin 4.0.1 -L (score >= {sa['required_score']})", sa, f"{sa['seconds_wall']} s wall, {sa['workers']} processes"),
        (f"triaged spam head ({tr['model']}, p >= {tr['threshold']:.3f})", tr, f"{tr['seconds']} s, 1 thread"),
    ):  # fmt: skip
        rows.append(
            f"| {name} | {x['precision']:.4f} | {x['recall']:.4f} | {x['f1']:.4f} | "
            f"{x['tp']} | {x['fp']} | {x['fn']} | {x['tn']} | {t} ({x['messages_per_s']} msg/s) |"
        )
    src = sorted(n["by_source"])
    spam_sources = set(n.get("spam_sources") or [s for s in src if "spam" in s])
    src_rows = [
        f"| {s} | {'spam' if s in spam_sources else 'ham'} | {sa['called_spam_by_source'][s]} | "
        f"{tr['called_spam_by_source'][s]} |"
        for s in src
    ]
    checks = ", ".join(f"{c['driver']} vs {c['cli']}" for c in sa["cli_cross_check"])
    sb, tb = sa["best_f1_threshold_on_test"], tr["best_f1_threshold_on_test"]
    rules = ", ".join(f"{k} {v}" for k, v in list(sa["top_rules_on_spam"].items())[:10])
    return f"""# SpamAssassin vs triaged spam head, same held-out messages

Created {r["created"]} (commit {r["commit"]}; model {tr["model_file"]["path"]}
sha256 {tr["model_file"]["sha256"]}..., built {tr["model_file"]["created"]}) by

    {r["command"]}

Messages: {r.get("split", SPLITS["classic"])}; n = {n["n"]} ({n["spam"]} spam, {n["ham"]} ham).

| filter | precision | recall | F1 | TP | FP | FN | TN | time |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Called spam, by corpus group:

| group | truth | SpamAssassin | triaged |
|---|---|---|---|
{chr(10).join(src_rows)}

Agreement: {r["both"]["agree"]} of {n["n"]}; only SpamAssassin right on
{r["both"]["sa_only_right"]}, only triaged right on {r["both"]["triaged_only_right"]}.

Best-F1 threshold picked on this same test set (an optimistic ceiling, not a
fair result): SpamAssassin score >= {sb["threshold"]}: F1 {sb["f1"]} (P {sb["precision"]},
R {sb["recall"]}); triaged p >= {tb["threshold"]}: F1 {tb["f1"]}.

## How SpamAssassin was run, and how to read this

- {sa["version"]}, {sa["mode"]}. No rules from sa-update are installed
  (/var/lib/spamassassin holds none), so these are the rules the Debian package
  ships in /usr/share/spamassassin. Each of {sa["workers"]} Perl processes sets up
  Mail::SpamAssassin once, exactly as `spamassassin -L -t` does, and forks a
  fresh copy of it per message, so every message is checked in the state the
  CLI checks its one message in. The real CLI
  (`spamassassin -L -t -x --cf='use_bayes 0' FILE`) re-scored a few messages to
  check (driver vs CLI): {checks}.
- Why a fork per message: one engine reused over hundreds of messages, as
  spamd's children do, scored some messages differently from the CLI (the 4.0
  "capture" rule GB_CUSTOM_HTM_URI stopped firing on hard-ham-1/00138.1bf66894...
  after 400 earlier messages: 1.8 points instead of 2.8). Reused that way over an
  earlier version of this split (n = 1203), SpamAssassin scored P 0.9355,
  R 0.7775, F1 0.8492: the difference does not change the picture.
{READING[r.get('set', 'classic')].format(rules=rules)}"""


if __name__ == "__main__":
    sys.exit(main())
