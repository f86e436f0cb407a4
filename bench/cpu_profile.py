"""Where triaged's CPU per message goes: exact per-process and per-thread CPU
from /proc, and a py-spy sample breakdown of what each of them runs.

    .venv/bin/python bench/cpu_profile.py                       # default ONNX model, -m 10000
    .venv/bin/python bench/cpu_profile.py --classifier rules -m 5000
    .venv/bin/python bench/cpu_profile.py --no-spy              # /proc figures only (no sampling cost)

Runs `smtp-source -s 20 -l 4096 -m N` into a fresh `triaged serve` (the
shipped defaults: inference process, JSON log line per message, events to a
file) forwarding to smtp-sink. py-spy (a dev dependency) samples all of
triaged's processes, non-blocking, at --rate Hz while the load runs; every
sample's stack is put in the first bucket of BUCKETS whose pattern it holds
(innermost frames first), so the shares say which layer was running.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from smtp_bench import CLK_TCK, Sink  # noqa: E402
from triaged_proc import TriagedProcess  # noqa: E402

# (bucket, regex on one frame "function (file:line)"); the innermost frame
# matching any pattern decides the bucket, so a structlog call inside
# pipeline.finish counts as logging, not as the pipeline.
BUCKETS: list[tuple[str, str]] = [
    ("logging (structlog, JSON render, write)", r"structlog/|proxy/logs\.py|_json_dumps"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("events (record, build, encode, JSONL)", r"proxy/events\.py|proxy/jsonl_sink\.py|proxy/spool\.py"),
    ("features (classifier/features.py, headers)", r"classifier/features\.py|classifier/headers\.py"),
    ("model call (onnxruntime, model.py)", r"onnxruntime|classifier/model\.py"),
    ("overrides, auth, rules", r"classifier/overrides\.py|classifier/auth\.py|classifier/rules\.py"),
    ("IPC to the inference process or service (wire, runners)",
     r"classifier/worker_wire\.py|classifier/process_runner\.py|classifier/worker_process\.py"
     r"|classifier/serving/service_wire\.py|classifier/serving/remote_runner\.py"),
    ("batcher and service", r"classifier/batcher\.py|classifier/loop_batcher\.py"
     r"|classifier/service\.py|classifier/inference\.py"),
    ("stamping", r"proxy/smtp/stamp\.py"),
    ("next-hop client and pool", r"proxy/smtp/client\.py|proxy/smtp/upstream\.py|proxy/smtp/envelope\.py"),
    ("pipeline (decide, finish, verdict)", r"proxy/pipeline\.py|proxy/verdict\.py|proxy/transaction\.py"),
    ("our SMTP session (session, syntax, compat)",
     r"proxy/smtp/session\.py|proxy/smtp/syntax\.py|proxy/smtp/compat\.py|proxy/smtp/dotstuff\.py"),
    ("aiosmtpd command loop", r"aiosmtpd/"),
    ("asyncio streams, tasks, timeouts", r"asyncio/"),
    ("event loop (uvloop, sockets)", r"uvloop|run_forever|selectors"),
]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread ("TID name user|system") of one process."""
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[f"{tid} {comm} user"] += int(stat[11]) / CLK_TCK
        out[f"{tid} {comm} system"] += int(stat[12]) / CLK_TCK
    return dict(out)


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split())
            except OSError:
                pass
    return pids


def snapshot(root: int) -> dict[tuple[int, str], float]:
    snap = {}
    for p in tree(root):
        try:
            for name, cpu in thread_cpu(p).items():
                snap[(p, name)] = cpu
        except OSError:
            continue
    return snap


def bucket_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost last in py-spy's raw format
        for name, pattern in _COMPILED:
            if pattern.search(frame):
                return name
    return "other Python"


_COMPILED = [(n, re.compile(p)) for n, p in BUCKETS]


def analyse(raw: Path, top: int) -> None:
    """Print the bucket shares per process and thread, and the hottest leaf frames."""
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        # "process PID:"command line"", "thread (TID): name", then the frames, outermost first.
        proc = frames[0]
        pid = proc.split()[1].rstrip(":") if proc.startswith("process ") else "?"
        kind = "inference" if "worker_process" in proc else "triaged"
        thread = next((f for f in frames[1:3] if f.startswith("thread ")), "thread ?")
        body = [f for f in frames[1:] if not f.startswith("thread ") and not f.startswith("process ")]
        key = f"{kind} pid {pid} {thread}"
        per_thread[key][bucket_of(body)] += int(count)
        if body:
            leaves[f"{kind}: {body[-1]}"] += int(count)
    grand = sum(sum(c.values()) for c in per_thread.values()) or 1
    for key, c in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(c.values())
        print(f"\n{key}: {n} samples ({n * 100 / grand:.0f}% of all)")
        for name, k in c.most_common():
            if k * 100 / n >= 0.5:
                print(f"  {k * 100 / n:5.1f}%  {name}")
    print(f"\nhottest leaf frames (top {top}, % of all samples):")
    for frame, k in leaves.most_common(top):
        print(f"  {k * 100 / grand:5.1f}%  {frame}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-m", "--messages", type=int, default=10000)
    ap.add_argument("--analyse", default="", help="only analyse this raw file from --keep-raw")
    ap.add_argument("-s", "--sessions", type=int, default=20)
    ap.add_argument("-l", "--length", type=int, default=4096)
    ap.add_argument("--classifier", choices=("onnx", "rules"), default="onnx")
    ap.add_argument("--server", default="", help="extra lines for [server], e.g. 'workers = 2'")
    ap.add_argument("--runner", default="", help="classifier.runner (default: the shipped one)")
    ap.add_argument("--rate", type=int, default=250)
    ap.add_argument("--launcher", default="",
                    help="run triaged as `python LAUNCHER serve --config ...` (experiments)")
    ap.add_argument("--no-spy", action="store_true")
    ap.add_argument("--gil", action="store_true",
                    help="only samples holding the GIL (py-spy's idle detection misses threads "
                         "blocked in C; with this the loop thread's waits in epoll are left out)")
    ap.add_argument("--keep-raw", default="", help="write py-spy's raw stacks to this file")
    ap.add_argument("--top", type=int, default=25, help="hottest leaf frames to print")
    args = ap.parse_args()
    if args.analyse:
        analyse(Path(args.analyse), args.top)
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    classifier = ('kind = "rules"' if args.classifier == "rules"
                  else f'kind = "onnx"\nmodel_path = "{REPO / "models" / "default.onnx"}"')
    if args.runner:
        classifier += f'\nrunner = "{args.runner}"'

    with tempfile.TemporaryDirectory(prefix="triaged-prof-") as tmp:
        sink = Sink()
        t = TriagedProcess(f"smtp://127.0.0.1:{sink.port}", workdir=Path(tmp),
                           python_args=(args.launcher,) if args.launcher else (),
                           sections={"classifier": classifier, "server": args.server}).start(120)
        try:
            warm = ["smtp-source", "-s", str(args.sessions), "-l", str(args.length), "-m", "500",
                    f"127.0.0.1:{t.port}"]
            subprocess.run(warm, check=True, capture_output=True)
            raw = Path(args.keep_raw) if args.keep_raw else Path(tmp) / "spy.txt"
            rec = None
            if not args.no_spy:
                rec = subprocess.Popen(
                    [spy, "record", "-p", str(t.pid), "--subprocesses", "--nonblocking", "-t",
                     *(["--gil"] if args.gil else []),
                     "-r", str(args.rate), "-f", "raw", "-o", str(raw)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)
            before = snapshot(t.pid)
            t0 = time.monotonic()
            cmd = ["smtp-source", "-s", str(args.sessions), "-l", str(args.length),
                   "-m", str(args.messages), f"127.0.0.1:{t.port}"]
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.monotonic() - t0
            after = snapshot(t.pid)
            if rec is not None:
                rec.send_signal(2)
                rec.wait(30)
        finally:
            t.stop()
            sink.stop()
        n = args.messages
        print(f"{n} messages in {wall:.2f} s: {n / wall:.0f} msg/s")
        total = 0.0
        main_pid = t_pid = None
        for key in sorted(after, key=lambda k: -(after[k] - before.get(k, 0.0))):
            d = after[key] - before.get(key, 0.0)
            total += d
            if d > 0:
                main_pid = main_pid or key[0]
                print(f"  pid {key[0]:>7} thread {key[1]:<24} {d * 1000 / n:6.3f} ms/msg")
        del t_pid
        print(f"  all processes                      {total * 1000 / n:6.3f} ms/msg")
        if args.no_spy or not raw.exists():
            return 0
        analyse(raw, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
