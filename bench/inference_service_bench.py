"""Shared inference service vs one inference process per worker, in one run.

    nice -n 10 .venv/bin/python bench/inference_service_bench.py            # 2 workers, CPU
    .venv/bin/python bench/inference_service_bench.py --workers 1,2,4 --messages 3000
    .venv/bin/python bench/inference_service_bench.py --provider cuda --out bench/results

For each worker count W, W worker processes (this script with --client) each
classify --messages corpus messages with --concurrency calls in flight
(an SMTP worker's sessions), through OnnxClassifierService with
  process  each worker has its own inference process (runner = "process"),
  service  every worker featurizes and sends arrays to one shared inference
           service (runner = "service", InferenceHost on a Unix socket).
Reported per row: verdicts/s over all workers (wall: the slowest worker),
CPU ms per message over every process involved (RUSAGE_CHILDREN of this
script: workers, their inference processes, the service), model-call batch
sizes (service: the service's stats; process: mean over the workers'
batchers) and, for the service, the share of batches mixing several workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "data-cache" / "spamassassin" / "package" / "data"


def corpus(limit: int) -> list[bytes]:
    files = sorted(CORPUS.glob("*/*"))
    raws = [f.read_bytes() for f in files if f.is_file()]
    if not raws:
        raise SystemExit(f"no corpus at {CORPUS} (make model unpacks it)")
    return [raws[i % len(raws)] for i in range(limit)]


async def client(runner: str, endpoint: str, model: str, provider: str, n: int,
                 concurrency: int, offset: int) -> None:
    import structlog

    from classifier.batch_metrics import BatchStats
    from classifier.config import ClassifierSettings
    from classifier.service import OnnxClassifierService

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    raws = corpus(n + offset)[offset:]
    s = ClassifierSettings(model_path=model, provider=provider, runner=runner,  # type: ignore[arg-type]
                           endpoint=endpoint, timeout_ms=30_000)
    stats = BatchStats()
    service = OnnxClassifierService(s, metrics=stats)
    await service.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    sem = asyncio.Semaphore(concurrency)
    fallbacks = 0

    async def one(raw: bytes) -> None:
        nonlocal fallbacks
        async with sem:
            r = await service.classify(raw)
            fallbacks += r.model.startswith("rules-fallback")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in raws))
    wall = time.perf_counter() - t0
    await service.close()
    sizes = stats.batch_sizes
    print(json.dumps({"wall_s": wall, "n": n, "fallbacks": fallbacks,
                      "mean_batch": sum(sizes) / len(sizes) if sizes else 0.0}), flush=True)


async def run_row(runner: str, workers: int, args: argparse.Namespace) -> dict[str, object]:
    from classifier.config import BatcherSettings, ClassifierSettings
    from classifier.serving.inference_host import InferenceHost

    tmp = tempfile.mkdtemp(prefix="infbench", dir="/tmp")
    endpoint = f"unix:{tmp}/inference.sock"
    host = None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    if runner == "service":
        s = ClassifierSettings(model_path=args.model, provider=args.provider,
                               timeout_ms=30_000, batcher=BatcherSettings())
        host = InferenceHost(s, endpoint)
        await host.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", runner, endpoint, args.model, args.provider,
            str(args.messages), str(args.concurrency), str(w * 997),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        for w in range(workers)
    ]
    for p in procs:
        assert p.stdout is not None
        line = await p.stdout.readline()
        assert line.strip() == b"ready", line
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    outs = [json.loads((await p.communicate())[0].decode().strip().splitlines()[-1]) for p in procs]
    service_stats = await host.stats() if host is not None else None
    if host is not None:
        await host.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = workers * args.messages
    wall = max(o["wall_s"] for o in outs)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row: dict[str, object] = {
        "runner": runner, "workers": workers, "messages": total,
        "verdicts_per_s": round(total / wall, 1),
        "cpu_ms_per_msg": round(1000 * cpu / total, 3),
        "fallbacks": sum(o["fallbacks"] for o in outs),
    }
    if service_stats is not None:
        sizes = service_stats.batch_sizes
        batches = sum(sizes.values())
        row["mean_batch"] = round(sum(k * v for k, v in sizes.items()) / max(batches, 1), 1)
        row["multi_worker_batches"] = round(service_stats.multi_client_batches / max(batches, 1), 3)
        row["worker_side_mean_batch"] = round(sum(o["mean_batch"] for o in outs) / workers, 1)
    else:
        row["mean_batch"] = round(sum(o["mean_batch"] for o in outs) / workers, 1)
    return row


async def main(args: argparse.Namespace) -> None:
    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for runner in ("process", "service"):
            row = await run_row(runner, workers, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": " ".join(sys.argv), "host": platform.node(), "cpus": os.cpu_count(),
            "model": args.model, "provider": args.provider,
            "concurrency_per_worker": args.concurrency,
            "loadavg_at_end": os.getloadavg()}
    if args.out:
        write_results(args, meta, rows)


def write_results(args: argparse.Namespace, meta: dict[str, object],
                  rows: list[dict[str, object]]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {args.name}", "", f"`{meta['command']}` on {meta['cpus']} CPUs "
             f"(load average at the end {meta['loadavg_at_end'][0]:.1f}), "
             f"{args.provider}, {args.concurrency} calls in flight per worker.", "",
             "| runner | workers | verdicts/s | CPU ms/msg | mean batch | multi-worker "
             "batches | fallbacks |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runner']} | {r['workers']} | {r['verdicts_per_s']} | "
                     f"{r['cpu_ms_per_msg']} | {r['mean_batch']} | "
                     f"{r.get('multi_worker_batches', '-')} | {r['fallbacks']} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        runner, endpoint, model, provider, n, conc, offset = sys.argv[2:9]
        asyncio.run(client(runner, endpoint, model, provider, int(n), int(conc), int(offset)))
        sys.exit(0)
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(ROOT / "models" / "default.onnx"))
    p.add_argument("--provider", default="cpu")
    p.add_argument("--workers", default="2")
    p.add_argument("--messages", type=int, default=2000, help="per worker")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per worker")
    p.add_argument("--out", default="")
    p.add_argument("--name", default="inference_service")
    asyncio.run(main(p.parse_args()))
