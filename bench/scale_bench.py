"""Scale benchmark (issue 13): triaged against the pooled naive relay, all rows in one run.

    .venv/bin/python bench/scale_bench.py                    # the recorded run: bench/results/scale.{md,json}
    .venv/bin/python bench/scale_bench.py -m 3000 --rounds 1 --no-write     # while developing
    .venv/bin/python bench/scale_bench.py --targets pooled,onnx-w1 --rounds 3 --no-write

Each round runs Postfix's `smtp-source -s 20 -l 4096 -m N` against, in turn:

  direct     smtp-source -> smtp-sink (what the load generator and sink can do)
  pooled     smtp-source -> bench/naive_relay.py --pooled -> smtp-sink
  onnx-w1    smtp-source -> triaged, default ONNX model, server.workers = 1 -> smtp-sink
  onnx-w2    the same with server.workers = 2
  rules-w1   triaged with the header-rules classifier, server.workers = 1
  floor      smtp-source -> bench/floor_relay.py -> smtp-sink (the CPU floor of
             relaying in Python on uvloop: callbacks only, nothing a filter needs)

triaged runs with its shipped defaults otherwise (inference process runner,
one canonical log line per message at level info, events to the JSON-lines
file). The workers rows exist only where the tree has `server.workers`
(proxy/settings.py); before that, triaged runs its single process and the
onnx-w2 row is skipped (said in the report).

Every run gets a fresh smtp-sink (its `-c` counter proves every message
arrived) and a fresh system under test, warmed with `--warmup` messages before
the measured run. Rounds alternate the order of the targets (forward, then
backward) so drift in other load on the machine spreads over all of them; the
report gives medians, and the triaged/pooled ratio per round (paired) as well.

CPU per message: utime+stime of the whole process tree of the system under
test (supervisor, workers, inference process), read from /proc before and
after the measured run, divided by N. Machine busy: the share of all CPUs
not idle over the run (/proc/stat), to show whether a row ran out of cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from smtp_bench import Sink, _git_commit, machine, proc_tree_cpu_s  # noqa: E402
from triaged_proc import TriagedProcess, free_port, wait_for_banner  # noqa: E402

TARGETS = ("direct", "pooled", "floor", "onnx-w1", "onnx-w2", "rules-w1",
           "before-onnx-w1", "before-onnx-w2", "before-rules-w1",
           "floor-reuse", "rules-w1-reuse", "onnx-w1-reuse")
DEFAULT_TARGETS = ("direct", "pooled", "floor", "onnx-w1", "onnx-w2", "rules-w1",
                   "before-onnx-w1", "before-onnx-w2")
# A "-reuse" target runs `smtp-source -d`: each session sends its messages on
# one connection (as Postfix's connection cache does to a content filter),
# so its CPU per message leaves out connecting, greeting, HELO and QUIT.
REUSE = "-reuse"
BEFORE = ("before-onnx-w1", "before-onnx-w2", "before-rules-w1")
NAMES = {
    "direct": "smtp-source → smtp-sink (no relay)",
    "pooled": "pooled naive relay (aiosmtpd + aiosmtplib, shared upstream pool)",
    "floor": "floor relay (bench/floor_relay.py: protocol callbacks, no filtering)",
    "onnx-w1": "triaged, default ONNX model, workers = 1",
    "onnx-w2": "triaged, default ONNX model, workers = 2",
    "rules-w1": "triaged, rules classifier, workers = 1",
    "before-onnx-w1": "triaged from --before-tree (the code before this change), default ONNX model, workers = 1",
    "before-onnx-w2": "triaged from --before-tree (the code before this change), default ONNX model, workers = 2",
    "before-rules-w1": "triaged from --before-tree (the code before this change), rules classifier, workers = 1",
    "floor-reuse": "floor relay, connections reused (`smtp-source -d`)",
    "rules-w1-reuse": "triaged, rules classifier, workers = 1, connections reused (`smtp-source -d`)",
    "onnx-w1-reuse": "triaged, default ONNX model, workers = 1, connections reused (`smtp-source -d`)",
}
MODEL = REPO / "models" / "default.onnx"
METRICS_PORTS: dict[int, int] = {}  # id(a TriagedProcess) -> its metrics listener's port


def has_workers() -> bool:
    """Whether this tree's config has `server.workers` (issue 13, item 1)."""
    from proxy.settings import ServerSettings

    return "workers" in ServerSettings.__struct_fields__


@dataclass
class Run:
    target: str
    round: int
    messages: int
    wall_s: float
    msg_per_s: float
    cpu_ms_per_msg: float | None  # the system under test's whole process tree
    processes: int  # in that tree at the end of the run
    machine_busy: float  # share of all CPUs busy over the run
    delivered: int
    batch_mean: float | None = None  # messages per model call (triaged's metrics)
    # Thread CPU the inference side spent per message, read from triaged's
    # own counters over the measured run: featurizing, and the model call
    # with the overrides. Under the run's load, so what they cost while
    # sharing the cores, not in isolation (bench/cpu_floor.py sets them apart).
    features_cpu_ms: float | None = None
    model_cpu_ms: float | None = None


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def tree_size(root: int) -> int:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    parents = {int(a): int(b) for a, b in (line.split() for line in out.splitlines() if line.strip())}
    n, todo = 0, [root]
    while todo:
        pid = todo.pop()
        n += 1
        todo.extend(c for c, p in parents.items() if p == pid)
    return n


def start_target(
    target: str, upstream_port: int, workdir: Path, workers: bool, before_tree: str = ""
) -> tuple[int, object]:
    """Start the system under test; (its port, a handle)."""
    if target in ("pooled", "floor"):
        port = free_port()
        script = ["naive_relay.py", "--pooled"] if target == "pooled" else ["floor_relay.py"]
        cmd = [sys.executable, str(BENCH / script[0]), *script[1:],
               "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_banner(port, 20, proc)
        return port, proc
    before = target.startswith("before-")
    kind, _, w = target.removeprefix("before-").partition("-w")
    model = Path(before_tree) / "models" / "default.onnx" if before else MODEL
    classifier = 'kind = "rules"' if kind == "rules" else f'kind = "onnx"\nmodel_path = "{model}"'
    # A tree from before server.workers refuses the key: it is one process anyway.
    tree_has_workers = workers and (
        not before or (Path(before_tree) / "proxy" / "supervisor.py").exists())
    server = f"workers = {int(w)}" if tree_has_workers else ""
    run_dir = workdir / f"{target}-{time.monotonic_ns()}"
    run_dir.mkdir()
    metrics_port = free_port()
    # The metrics listener only answers scrapes (batch_mean, read after the
    # run); the counters behind it are kept whether it listens or not.
    triaged = TriagedProcess(
        f"smtp://127.0.0.1:{upstream_port}", workdir=run_dir,
        sections={"classifier": classifier, "server": server},
        extra_toml=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )
    METRICS_PORTS[id(triaged)] = metrics_port
    saved = os.environ.get("PYTHONPATH")
    if before:
        os.environ["PYTHONPATH"] = before_tree  # the child imports that tree's proxy and classifier
    try:
        triaged.start(timeout=120)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return triaged.port, triaged


# triaged's counters behind Run.batch_mean, features_cpu_ms and model_cpu_ms.
CLASSIFIER_SERIES = {
    "batch_sum": "triaged_classifier_batch_size_sum",
    "batch_count": "triaged_classifier_batch_size_count",
    "features_cpu_s": "triaged_classifier_features_cpu_seconds_total",
    "model_cpu_s": "triaged_classifier_model_cpu_seconds_total",
}


def classifier_totals(handle: object) -> dict[str, float] | None:
    """The CLASSIFIER_SERIES so far, from triaged's metrics listener."""
    port = METRICS_PORTS.get(id(handle))
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    wanted = {series: key for key, series in CLASSIFIER_SERIES.items()}
    total = dict.fromkeys(CLASSIFIER_SERIES, 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        key = wanted.get(name.split("{")[0])
        if key is not None:
            total[key] += float(value)
    return total


def pid_of(handle: object) -> int:
    if isinstance(handle, TriagedProcess):
        return handle.pid
    assert isinstance(handle, subprocess.Popen)
    return handle.pid


def stop_target(handle: object) -> None:
    METRICS_PORTS.pop(id(handle), None)  # an id is reused once its object is gone
    if isinstance(handle, TriagedProcess):
        code = handle.stop()
        if code not in (0, -15):
            print(f"triaged exited with {code}; log tail:\n{handle.log_tail()}", file=sys.stderr)
        return
    assert isinstance(handle, subprocess.Popen)
    handle.terminate()
    try:
        handle.wait(30)
    except subprocess.TimeoutExpired:
        handle.kill()
        handle.wait()


def smtp_source(args: argparse.Namespace, port: int, messages: int, reuse: bool = False) -> None:
    cmd = ["smtp-source", *(["-d"] if reuse else []), "-s", str(args.sessions), "-l", str(args.length),
           "-m", str(messages), f"127.0.0.1:{port}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.strip()}")


def one_run(target: str, rnd: int, args: argparse.Namespace, workdir: Path, workers: bool) -> Run:
    system, reuse = target.removesuffix(REUSE), target.endswith(REUSE)
    sink = Sink()
    handle: object = None
    pid: int | None = None
    try:
        if system == "direct":
            port = sink.port
        else:
            port, handle = start_target(system, sink.port, workdir, workers, args.before_tree)
            pid = pid_of(handle)
        if args.warmup:
            smtp_source(args, port, args.warmup, reuse)
        cpu0 = proc_tree_cpu_s(pid) if pid else 0.0
        counters0 = classifier_totals(handle)
        busy0, total0 = machine_busy_ticks()
        t0 = time.monotonic()
        smtp_source(args, port, args.messages, reuse)
        wall = time.monotonic() - t0
        busy1, total1 = machine_busy_ticks()
        cpu1 = proc_tree_cpu_s(pid) if pid else 0.0
        procs = tree_size(pid) if pid else 0
        counters1 = classifier_totals(handle)
    finally:
        if handle is not None:
            stop_target(handle)
        delivered = sink.stop()
    expected = args.messages + args.warmup
    if delivered != expected:
        raise RuntimeError(f"{target}: sink counted {delivered} of {expected} messages")
    return Run(
        target=target, round=rnd, messages=args.messages, wall_s=round(wall, 3),
        msg_per_s=round(args.messages / wall, 1),
        cpu_ms_per_msg=round((cpu1 - cpu0) * 1000 / args.messages, 3) if pid else None,
        processes=procs,
        machine_busy=round((busy1 - busy0) / max(total1 - total0, 1), 3),
        delivered=delivered - args.warmup,
        batch_mean=_mean_batch(counters0, counters1),
        features_cpu_ms=_per_message(counters0, counters1, "features_cpu_s", args.messages),
        model_cpu_ms=_per_message(counters0, counters1, "model_cpu_s", args.messages),
    )


def _mean_batch(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    if before is None or after is None or after["batch_count"] <= before["batch_count"]:
        return None
    calls = after["batch_count"] - before["batch_count"]
    return round((after["batch_sum"] - before["batch_sum"]) / calls, 2)


def _per_message(
    before: dict[str, float] | None, after: dict[str, float] | None, key: str, messages: int
) -> float | None:
    """Milliseconds of `key` (seconds) per message over the run; None without
    a model (no batches) or metrics."""
    if before is None or after is None or after["batch_count"] <= before["batch_count"]:
        return None
    return round((after[key] - before[key]) * 1000 / messages, 3)


def summarise(runs: list[Run]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    by_round: dict[int, dict[str, Run]] = {}
    for r in runs:
        by_round.setdefault(r.round, {})[r.target] = r
    for target in TARGETS:
        mine = [r for r in runs if r.target == target]
        if not mine:
            continue
        cpu = [r.cpu_ms_per_msg for r in mine if r.cpu_ms_per_msg is not None]
        row: dict[str, float | None] = {
            "runs": len(mine),
            "msg_per_s_median": round(statistics.median(r.msg_per_s for r in mine), 1),
            "msg_per_s_min": min(r.msg_per_s for r in mine),
            "msg_per_s_max": max(r.msg_per_s for r in mine),
            "cpu_ms_per_msg_median": round(statistics.median(cpu), 3) if cpu else None,
            "machine_busy_median": round(statistics.median(r.machine_busy for r in mine), 3),
            "processes": max(r.processes for r in mine),
        }
        for field, key, digits in (("batch_mean", "batch_mean_median", 2),
                                   ("features_cpu_ms", "features_cpu_ms_median", 3),
                                   ("model_cpu_ms", "model_cpu_ms_median", 3)):
            values = [v for r in mine if (v := getattr(r, field)) is not None]
            if values:
                row[key] = round(statistics.median(values), digits)
        ratios = [
            rr[target].msg_per_s / rr["pooled"].msg_per_s
            for rr in by_round.values() if target in rr and "pooled" in rr
        ]
        if ratios and target not in ("pooled", "direct"):
            row["vs_pooled_paired_median"] = round(statistics.median(ratios), 2)
        out[target] = row
    if "pooled" in out:
        base = out["pooled"]["msg_per_s_median"]
        for target, row in out.items():
            if target not in ("pooled", "direct") and base:
                row["vs_pooled"] = round(row["msg_per_s_median"] / base, 2)  # type: ignore[operator]
    return out


def write_markdown(path: Path, report: dict[str, object]) -> None:
    m, s, a = report["machine"], report["summary"], report["args"]
    assert isinstance(m, dict) and isinstance(s, dict) and isinstance(a, dict)
    lines = [
        "# Scale benchmark (issue 13)",
        "",
        f"Recorded {report['when']} by `{report['command']}` at commit `{report['commit']}`.",
        "",
        f"Machine: `{m['hostname']}`, {m['cpu']}, {m['cpus']} CPUs shared by smtp-source, the "
        f"system under test and smtp-sink; Linux {m['kernel']}, Python {m['python']}, Postfix tools "
        f"{m['postfix_tools']}; load average at start {' '.join(m['loadavg_at_start'])}.",
        "",
        f"Load: `smtp-source -s {a['sessions']} -l {a['length']} -m {a['messages']}` (a new "
        f"connection per message, no pipelining) after {a['warmup']} warm-up messages, "
        f"{a['rounds']} rounds alternating the order of the rows, medians; every run's smtp-sink "
        "counted every message.",
        "",
        "| system under test | msg/s (median) | min-max | vs pooled | vs pooled, paired | "
        "CPU ms/msg, all its processes | messages per model call | processes | machine busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, row in s.items():
        cpu = row["cpu_ms_per_msg_median"]
        vs = row.get("vs_pooled")
        paired = row.get("vs_pooled_paired_median")
        lines.append(
            f"| {NAMES[target]} | {row['msg_per_s_median']:.0f} | "
            f"{row['msg_per_s_min']:.0f}-{row['msg_per_s_max']:.0f} | "
            f"{'—' if vs is None else f'{vs:.2f}x'} | {'—' if paired is None else f'{paired:.2f}x'} | "
            f"{'—' if cpu is None else f'{cpu:.3f}'} | {row.get('batch_mean_median') or '—'} | "
            f"{row['processes'] or '—'} | "
            f"{row['machine_busy_median'] * 100:.0f}% |"
        )
    lines.append("")
    for target in ("onnx-w1", "onnx-w2"):
        row = s.get(target)
        if not row or row.get("vs_pooled") is None:
            continue
        vs, cpu = row["vs_pooled"], row["cpu_ms_per_msg_median"]
        lines.append(
            f"- {NAMES[target]}: **{vs:.2f}x** the pooled naive relay's msg/s (target >= 1.5x: "
            f"{'met' if vs >= 1.5 else 'not met'}), **{cpu:.3f} ms** CPU per message "
            f"(target <= 0.5 ms: {'met' if cpu is not None and cpu <= 0.5 else 'not met'})."
        )
    for w in (1, 2):
        b, a = s.get(f"before-onnx-w{w}"), s.get(f"onnx-w{w}")
        if b and a and b["cpu_ms_per_msg_median"] and a["cpu_ms_per_msg_median"]:
            lines.append(
                f"- Before → after this change, workers = {w}, same run: "
                f"{b['msg_per_s_median']:.0f} → {a['msg_per_s_median']:.0f} msg/s, "
                f"{b['cpu_ms_per_msg_median']:.3f} → {a['cpu_ms_per_msg_median']:.3f} ms CPU per "
                f"message ({(a['cpu_ms_per_msg_median'] / b['cpu_ms_per_msg_median'] - 1) * 100:+.0f}%)."
            )
    for note in report.get("notes", []):  # type: ignore[union-attr]
        lines.append(f"- {note}")
    lines += [
        "",
        "Targets (issue 13, here on 2 cores): triaged with the default model >= 1.5x the pooled "
        "naive relay's msg/s, and triaged's CPU per message (all its processes) <= 0.5 ms.",
        "",
        "CPU ms/msg: utime+stime of the system under test's process tree (/proc, 10 ms ticks) "
        "over the measured run, divided by the message count. Machine busy: share of both CPUs "
        "not idle over the run (/proc/stat), everything on the machine included.",
        "Raw runs: `scale.json` beside this file.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-m", "--messages", type=int, default=10000)
    parser.add_argument("-s", "--sessions", type=int, default=20)
    parser.add_argument("-l", "--length", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--no-write", action="store_true", help="print only, keep bench/results as is")
    parser.add_argument("--before-tree", default="",
                        help="a checkout of the code before the change measured: adds the "
                             "before-onnx-w1 row (list before-onnx-w2 in --targets for that one too)")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    parser.add_argument("--out", default=str(BENCH / "results" / "scale"),
                        help="results path without extension")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}")
    workers = has_workers()
    notes: list[str] = list(args.note)
    if args.before_tree and "before-onnx-w1" not in targets:
        targets.append("before-onnx-w1")
    if not args.before_tree:
        targets = [t for t in targets if t not in BEFORE]
    else:
        commit = subprocess.run(["git", "-C", args.before_tree, "describe", "--always"],
                                capture_output=True, text=True).stdout.strip()
        notes.append(f"The before rows ran the tree at commit `{commit}` (the code before this change).")
    if not workers:
        notes.append("This tree has no `server.workers` yet: triaged ran as one process; "
                     "the workers = 2 row was left out.")
        targets = [t for t in targets if t != "onnx-w2"]
    report: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["bench/scale_bench.py", *sys.argv[1:]]),
        "commit": _git_commit(),
        "machine": machine(),
        "args": {"messages": args.messages, "sessions": args.sessions, "length": args.length,
                 "warmup": args.warmup, "rounds": args.rounds, "targets": targets},
        "workers_option": workers,
        "notes": notes,
    }
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="triaged-scale-") as tmp:
        for rnd in range(1, args.rounds + 1):
            order = targets if rnd % 2 else targets[::-1]
            for target in order:
                run = one_run(target, rnd, args, Path(tmp), workers)
                runs.append(run)
                cpu = run.cpu_ms_per_msg
                print(f"round {rnd} {target:9s} {run.msg_per_s:8.1f} msg/s  "
                      f"cpu {'-' if cpu is None else f'{cpu:.3f}'} ms/msg  "
                      f"busy {run.machine_busy * 100:3.0f}%  procs {run.processes}  "
                      f"batch {run.batch_mean or '-'}", flush=True)
    report["runs"] = [asdict(r) for r in runs]
    report["summary"] = summarise(runs)
    print(json.dumps(report["summary"], indent=2))
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(out.with_suffix(".md"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
