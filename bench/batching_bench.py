"""Micro-batching benchmark: the classifier inside the server vs offline.

    .venv/bin/python bench/batching_bench.py                       # models/default.onnx, CPU
    .venv/bin/python bench/batching_bench.py --smtp                # + 64 SMTP clients via triaged
    .venv/bin/python bench/batching_bench.py --runners process,thread --smtp
    .venv/bin/python bench/batching_bench.py --model M.onnx --provider cuda --out DIR
    .venv/bin/python bench/batching_bench.py --standin             # no trained model yet

Parts:
  offline    classifier.inference.classify_batch (features, one model call,
             overrides: exactly a runner's work) over the corpus in fixed
             batches, one thread, nothing else running: the ceiling for a
             given batch size.
  inprocess  64 concurrent callers of OnnxClassifierService.classify() on one
             event loop, for --seconds, per runner (the inference process or
             the in-process thread). Reported: classifier throughput (verdicts
             / wall s), mean batch size, p50/p99 queue wait, p50/p99 classify()
             latency, and the offline throughput at the same (mean) batch
             size for the ratio. Rounds interleave with their offline run.
  smtp       (--smtp) 64 concurrent SMTP clients (a child process, SCHED_IDLE) ->
             triaged (this process, uvloop) -> smtp-sink, per runner, and the
             same server with the rules classifier for the added latency.
             SMTP, not the classifier, limits this load, so the classifier is
             compared with offline per second of its own work (wall and CPU).

Targets (issue 4): in-server >= 80% of offline at the same batch size;
p99 queue wait <= max_wait_ms + one inference time (p99 batch run: the worker
thread's whole round trip to the runner).
The standin model (--standin) has the default model's graph shape with random
weights: batching cost does not depend on the weights, only on the shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from classifier.batch_metrics import BatchStats, percentile  # noqa: E402
from classifier.config import BatcherSettings, ClassifierSettings  # noqa: E402
from classifier.inference import (  # noqa: E402
    BatchModel,
    classify_batch,
    labels_of,
    load_and_warm,
    load_onnx_model,
)

CORPUS = REPO / "data-cache" / "spamassassin" / "package" / "data"


def load_messages(limit: int, corpus: Path | None = None) -> list[bytes]:
    """Up to `limit` raw messages from corpus/<group>/*.txt (default: the
    SpamAssassin corpus, or $TRIAGED_BENCH_CORPUS)."""
    root = corpus or Path(os.environ.get("TRIAGED_BENCH_CORPUS", CORPUS))
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise SystemExit(f"no corpus at {root}: run `make corpus`")
    # Interleave the groups so every slice has ham and spam.
    files.sort(key=lambda p: (hash(p.name) & 0xFFFF, p.name))
    return [p.read_bytes() for p in files[:limit]]


def build_standin(path: Path, *, dim: int = 64, labels: int = 5) -> Path:
    """An untrained model with the default model's graph and manifest shape."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from classifier.features import FeatureParams
    from classifier.model import MANIFEST_KEY, Manifest, encode_manifest

    params = FeatureParams()
    rng = np.random.default_rng(1)
    emb = (rng.standard_normal((params.buckets, dim)) * 0.1).astype(np.float32)
    emb[0] = 0
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(rng.standard_normal((dim, labels)).astype(np.float32), "wc"),
        numpy_helper.from_array(rng.standard_normal((dim, 1)).astype(np.float32), "ws"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e", "axis1"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "wc"], ["lc"]),
        helper.make_node("Softmax", ["lc"], ["category_probs"], axis=1),
        helper.make_node("MatMul", ["m", "ws"], ["ls"]),
        helper.make_node("Sigmoid", ["ls"], ["spam_prob"]),
    ]
    graph = helper.make_graph(
        nodes, "standin",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("category_probs", TensorProto.FLOAT, ["N", labels]),
         helper.make_tensor_value_info("spam_prob", TensorProto.FLOAT, ["N", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    names = ["primary", "forums", "updates", "promotions", "spam"][:labels]
    manifest = Manifest(name="standin", version="0", labels=names, features=params)
    helper.set_model_props(model, {MANIFEST_KEY: encode_manifest(manifest)})
    onnx.save(model, str(path))
    return path


# -- offline -------------------------------------------------------------------


def offline(model: BatchModel, messages: list[bytes], batch: int, min_s: float) -> dict[str, Any]:
    """A runner's work (classify_batch) in batches of `batch`, one thread,
    repeated until min_s elapsed."""
    labels = labels_of(model)
    done = 0
    feat_s = feat_cpu = model_s = model_cpu = 0.0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - t0 < min_s:
        for i in range(0, len(messages) - batch + 1, batch):
            _, timing = classify_batch(model, messages[i : i + batch], overrides=True, labels=labels)
            feat_s += timing.features_s
            feat_cpu += timing.features_cpu_s
            model_s += timing.model_s
            model_cpu += timing.model_cpu_s
            done += batch
    work = feat_s + model_s
    return {
        "batch": batch,
        "msg_per_s": done / work,
        "predict_only_msg_per_s": done / model_s,
        "batch_ms": 1000 * work / (done / batch),
        "process_cpu_us_per_msg": 1e6 * (time.process_time() - cpu0) / done,
        "cpu_us_per_msg": 1e6 * (feat_cpu + model_cpu) / done,
        "features_us_per_msg": 1e6 * feat_s / done,
        "model_us_per_msg": 1e6 * model_s / done,
        "features_cpu_us_per_msg": 1e6 * feat_cpu / done,
        "model_cpu_us_per_msg": 1e6 * model_cpu / done,
    }


def classifier_row(stats: BatchStats, wall_s: float) -> dict[str, Any]:
    """What the batcher's hooks saw over `wall_s` seconds of load."""
    done = stats.items
    work = stats.features_total_s + stats.model_total_s  # inside the runner
    per = (lambda x: 1e6 * x / done) if done else (lambda x: 0.0)
    return {
        "verdicts": done,
        "batches": stats.batches,
        "mean_batch": stats.mean_batch_size,
        "close_reasons": dict(stats.close_reasons),
        # The runner's own work (features + model call, wall clock where it ran).
        "msg_per_work_s": done / work if work else 0.0,
        "runner_busy_pct": 100 * work / wall_s,
        "features_us_per_msg": per(stats.features_total_s),
        "model_us_per_msg": per(stats.model_total_s),
        "cpu_us_per_msg": per(stats.features_cpu_s + stats.model_cpu_s),
        "features_cpu_us_per_msg": per(stats.features_cpu_s),
        "model_cpu_us_per_msg": per(stats.model_cpu_s),
        "queue_wait_p50_ms": 1000 * percentile(stats.queue_waits_s, 50),
        "queue_wait_p99_ms": 1000 * percentile(stats.queue_waits_s, 99),
        "batch_run_p50_ms": 1000 * percentile(stats.inference_s, 50),
        "batch_run_p99_ms": 1000 * percentile(stats.inference_s, 99),
        "timeouts": stats.timeouts,
        "overloads": stats.overloads,
        "errors": stats.errors,
    }


def compare(row: dict[str, Any], ref: dict[str, Any], bound_base_ms: float) -> dict[str, Any]:
    """Ratios of a load run to offline at its batch size, and the wait bound."""
    bound = bound_base_ms + row["batch_run_p99_ms"]
    return {
        "work_ratio": row["msg_per_work_s"] / ref["msg_per_s"],
        "cpu_ratio": ref["cpu_us_per_msg"] / row["cpu_us_per_msg"] if row["cpu_us_per_msg"] else 0.0,
        "wait_bound_ms": bound,
        "wait_met": row["queue_wait_p99_ms"] <= bound,
    }


# -- in-process ----------------------------------------------------------------


async def inprocess(settings: ClassifierSettings, messages: list[bytes], clients: int,
                    seconds: float, warmup_s: float) -> dict[str, Any]:
    from classifier.service import OnnxClassifierService

    stats = BatchStats()
    service = OnnxClassifierService(settings, metrics=stats)
    await service.start()
    latencies: list[float] = []
    measuring = False
    stop = False
    loop = asyncio.get_running_loop()

    async def client(k: int) -> None:
        i = k
        while not stop:
            raw = messages[i % len(messages)]
            i += clients
            t = loop.time()
            await service.classify(raw)
            if measuring:
                latencies.append(loop.time() - t)

    try:
        tasks = [asyncio.create_task(client(k)) for k in range(clients)]
        await asyncio.sleep(warmup_s)
        stats.reset()
        measuring = True
        lags: list[float] = []
        probe = asyncio.create_task(_loop_lag(lags))
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        probe.cancel()
        measuring = False
        row = classifier_row(stats, wall)
        stop = True
        await asyncio.gather(*tasks)
    finally:
        await service.close()
    done = row["verdicts"]
    return row | {
        "runner": settings.runner,
        "provider": service.provider,
        "model": service.model_name,
        "clients": clients,
        "wall_s": wall,
        "msg_per_s": done / wall,
        # This process (loop, callers, worker thread; with the thread runner
        # also the runner's work) per verdict.
        "server_cpu_us_per_msg": 1e6 * cpu / done if done else 0.0,
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p99_ms": 1000 * percentile(latencies, 99),
        "loop_lag_p50_ms": 1000 * percentile(lags, 50),
        "loop_lag_p99_ms": 1000 * percentile(lags, 99),
    }


# -- SMTP ----------------------------------------------------------------------
# The server runs in this process (so the batcher's stats can be read from
# its service); the 64 clients run in a child process (`_client` mode) so
# they do not share the server's event loop or GIL.


def _smtp_data(raw: bytes) -> bytes:
    """`raw` as the DATA phase sends it: CRLF lines, dot-stuffed, terminated."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> int:
    """The code of one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"bad reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


async def _client_load(port: int, clients: int, seconds: float, warmup_s: float,
                       limit: int, rate: float) -> dict[str, Any]:
    """`clients` concurrent SMTP sessions, each sending corpus messages back to
    back. A plain asyncio client rather than aiosmtplib: the load generator
    shares this machine's cores with triaged, and at a third of the CPU per
    message it leaves more of them to the system under test. With `rate` > 0
    each client paces itself to rate / clients messages per second."""
    datas = [_smtp_data(m) for m in load_messages(limit)]
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures = 0
    start = loop.time()
    measure_from = start + warmup_s
    end = measure_from + seconds

    async def one(k: int) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        try:
            await _reply(reader)
            writer.write(b"EHLO bench.example\r\n")
            await _reply(reader)
            i = k
            interval = clients / rate if rate > 0 else 0.0
            due = loop.time() + interval * k / clients  # spread the clients' phases
            while loop.time() < end:
                if interval:
                    due += interval
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                data = datas[i % len(datas)]
                i += clients
                t = time.perf_counter()
                writer.write(b"MAIL FROM:<bench@example.com> BODY=8BITMIME\r\n")
                codes = [await _reply(reader)]
                writer.write(b"RCPT TO:<user@example.net>\r\n")
                codes.append(await _reply(reader))
                writer.write(b"DATA\r\n")
                codes.append(await _reply(reader))
                if codes != [250, 250, 354]:
                    failures += 1
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    continue
                writer.write(data)
                if await _reply(reader) != 250:
                    failures += 1
                    continue
                if loop.time() >= measure_from:
                    latencies.append(time.perf_counter() - t)
            writer.write(b"QUIT\r\n")
            await _reply(reader)
        finally:
            writer.close()

    await asyncio.gather(*(one(k) for k in range(clients)))
    return {"sent": len(latencies), "failures": failures, "msg_per_s": len(latencies) / seconds,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


def _aiosmtpd_sink(port: int) -> None:
    """Stand-in next hop where Postfix's smtp-sink is not installed: accept all."""
    from aiosmtpd.smtp import SMTP

    class Accept:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok: discarded"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: SMTP(Accept()), "127.0.0.1", port, backlog=1024)
        async with srv:
            await srv.serve_forever()

    asyncio.run(serve())


def _harness(args: argparse.Namespace) -> list[str]:
    """The command prefix for the load generator and the sink.

    In production the senders and the next hop are other machines; here they
    share triaged's two cores. At SCHED_IDLE they run only on cycles triaged
    and its inference process leave, which is the nearest a single machine
    gets to that; "normal" measures the three competing as equals.
    """
    return ["chrt", "--idle", "0"] if args.harness_sched == "idle" else []


def _smtp_sink(prefix: list[str]) -> tuple[Any, int]:
    import shutil
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if shutil.which("smtp-sink"):
        cmd = ["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1024"]
    else:
        print("smtp-sink not installed: using an aiosmtpd sink", flush=True)
        cmd = [sys.executable, __file__, "_sink", str(port)]
    proc = subprocess.Popen([*prefix, *cmd])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("smtp-sink did not start")


async def _serve_and_load(kind: str, runner: str, model_path: Path, sink_port: int,
                          args: argparse.Namespace, rate: float) -> dict[str, Any]:
    from classifier.rules import RulesClassifier
    from classifier.service import OnnxClassifierService
    from proxy.server import Server
    from proxy.settings import ListenerSettings, ServerSettings, Settings, UpstreamSettings

    csettings = classifier_settings(args, model_path, runner)
    settings = Settings(
        server=ServerSettings(listeners=[ListenerSettings(address="127.0.0.1:0")]),
        upstream=UpstreamSettings(url=f"smtp://127.0.0.1:{sink_port}", pool_size=args.clients),
        classifier=csettings,
    )
    stats = BatchStats()
    classifier: Any = (OnnxClassifierService(csettings, metrics=stats) if kind == "onnx"
                       else RulesClassifier())
    server = Server(settings, classifier=classifier)
    await server.start()
    try:
        port = server.addresses[0][1]
        proc = await asyncio.create_subprocess_exec(
            *_harness(args), sys.executable, __file__, "_client", str(port), str(args.clients),
            str(args.smtp_seconds), str(args.warmup), str(args.messages), str(rate),
            stdout=asyncio.subprocess.PIPE,
        )
        # Reset the batcher's stats when the client's warm-up ends.
        await asyncio.sleep(args.warmup)
        stats.reset()
        lags: list[float] = []
        probe = asyncio.create_task(_loop_lag(lags))
        cpu0 = time.process_time()
        child = getattr(getattr(classifier, "runner", None), "pid", None)
        sched0 = _schedstat(child)
        out, _ = await proc.communicate()
        cpu = time.process_time() - cpu0
        sched1 = _schedstat(child)
        probe.cancel()
        if proc.returncode != 0:
            raise SystemExit(f"SMTP client load failed ({proc.returncode})")
        row: dict[str, Any] = json.loads(out)
    finally:
        await server.stop(drain_timeout_s=5)
    # How late a 10 ms timer fires on the server's loop.
    row["loop_lag_p50_ms"] = 1000 * percentile(lags, 50)
    row["loop_lag_p99_ms"] = 1000 * percentile(lags, 99)
    # triaged's own process (not the inference process) per relayed message.
    row["server_cpu_us_per_msg"] = 1e6 * cpu / row["sent"] if row["sent"] else 0.0
    if kind == "onnx":
        row |= classifier_row(stats, args.smtp_seconds)
    if sched0 and sched1 and row["sent"]:
        # The inference process's own accounting (/proc/PID/schedstat): time
        # on a CPU, and time runnable but waiting for one (cores taken by the
        # load generator, the sink and triaged's loop).
        row["runner_oncpu_us_per_msg"] = (sched1[0] - sched0[0]) / 1000 / stats.items
        row["runner_runqueue_us_per_msg"] = (sched1[1] - sched0[1]) / 1000 / stats.items
    return row


def _schedstat(pid: int | None) -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting on a run queue) of a process, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return None
    return int(fields[0]), int(fields[1])


async def _loop_lag(lags: list[float]) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)


def run_smtp(model_path: Path, args: argparse.Namespace, model: BatchModel,
             messages: list[bytes], runners: list[str]) -> dict[str, Any]:
    import uvloop

    from proxy.logs import configure
    from proxy.settings import LoggingSettings

    # Log as `triaged serve` does off a terminal (one JSON line per
    # transaction), to a file rather than this terminal.
    log_file = (Path(os.environ.get("TMPDIR", "/tmp")) / "triaged-batching-smtp.log").open("w")
    configure(LoggingSettings(format="json"), stream=log_file)
    rates = [float(r) for r in args.smtp_rates.split(",")]
    sink, sink_port = _smtp_sink(_harness(args))
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        for n in range(args.smtp_rounds):
            for rate in rates:
                at = f" @ {rate:.0f}/s" if rate else ""
                for name, kind, runner in [("rules", "rules", "process")] + [
                    (f"onnx-{r}", "onnx", r) for r in runners
                ]:
                    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
                        row = loop_runner.run(
                            _serve_and_load(kind, runner, model_path, sink_port, args, rate))
                    row |= {"kind": kind, "runner": runner, "rate": rate, "round": n + 1}
                    rounds.setdefault(name + at, []).append(row)
                    print(f"smtp round {n + 1} {name + at}: {row['msg_per_s']:,.0f} msg/s",
                          flush=True)
    finally:
        sink.terminate()
        sink.wait()
        log_file.close()
    for name, rows in rounds.items():
        for on in rows:
            if on["kind"] != "onnx":
                continue
            rules = next(r for r in rounds[name.replace(f"onnx-{on['runner']}", "rules", 1)]
                         if r["round"] == on["round"])
            # Offline right after, at the batch size this run reached.
            ref = offline(model, messages, max(1, round(on["mean_batch"])), args.offline_seconds)
            on["offline_ref"] = ref
            on |= compare(on, ref, args.max_wait_ms)
            on["added_p50_ms"] = on["p50_ms"] - rules["p50_ms"]
            on["added_p99_ms"] = on["p99_ms"] - rules["p99_ms"]
    # Each configuration's round with the median classifier ratio (for the
    # rules runs: the median throughput) is the one reported in full.
    runs = {name: sorted(rows, key=lambda r: r.get("work_ratio", r["msg_per_s"]))[len(rows) // 2]
            for name, rows in rounds.items()}
    return {"clients": args.clients, "harness_sched": args.harness_sched, "runs": runs,
            "rounds": rounds}


# -- report --------------------------------------------------------------------


def machine(provider: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    if provider == "cuda":
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )
        info["gpu"] = out.stdout.strip() or "unknown"
    return info


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lead = report["inprocess"][report["runners"][0]]
    lines = [
        f"# Micro-batching benchmark ({lead['provider']})",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- Machine: {m['host']}, {m['cpu']}, {m['cores']} cores"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; onnxruntime {m['onnxruntime']}, Python {m['python']}",
        f"- Model: {lead['model']}; {report['messages']} SpamAssassin messages, cycled",
        f"- Batcher: max_batch_size={s['max_batch_size']}, max_wait_ms={s['max_wait_ms']}, "
        f"intra_op_num_threads={s['threads']}; {lead['clients']} concurrent callers; "
        f"runners: {', '.join(report['runners'])} (the first is the default)",
        "",
        "## Offline (a runner's work: features + one model call + overrides; one thread)",
        "",
        "| batch | msg/s | model-call-only msg/s | ms per batch | CPU us per msg |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["offline"]:
        lines.append(f"| {row['batch']} | {row['msg_per_s']:,.0f} | "
                     f"{row['predict_only_msg_per_s']:,.0f} | {row['batch_ms']:.2f} | "
                     f"{row['cpu_us_per_msg']:.0f} |")
    verdicts: list[str] = []
    for runner in report["runners"]:
        ip = report["inprocess"][runner]
        ref = ip["offline_ref"]
        rounds = report["rounds"][runner]
        lines += [
            "",
            f"## In-process, runner = {runner}: {ip['clients']} concurrent classify() callers",
            "",
            "| metric | value |",
            "|---|---:|",
            f"| classifier throughput (verdicts / wall s) | {ip['msg_per_s']:,.0f} msg/s |",
            f"| offline at the same batch size ({ref['batch']}) | {ref['msg_per_s']:,.0f} msg/s |",
            f"| **in-server / offline** (target >= 80%) | **{_pct(ip['ratio'])}** |",
            f"| runner's own work: verdicts per busy second, vs offline | "
            f"{ip['msg_per_work_s']:,.0f} msg/s ({_pct(ip['work_ratio'])}) |",
            f"| runner CPU per verdict (features + model), in-server vs offline | "
            f"{ip['cpu_us_per_msg']:.0f} vs {ref['cpu_us_per_msg']:.0f} us ({_pct(ip['cpu_ratio'])}) |",
            f"| triaged process CPU per verdict (loop, callers, worker thread) | "
            f"{ip['server_cpu_us_per_msg']:.0f} us |",
            f"| runner busy | {ip['runner_busy_pct']:.0f}% |",
            f"| mean batch size | {ip['mean_batch']:.1f} |",
            f"| batches closed by | {ip['close_reasons']} |",
            f"| queue wait p50 / p99 | {ip['queue_wait_p50_ms']:.2f} / {ip['queue_wait_p99_ms']:.2f} ms |",
            f"| batch run (worker's round trip) p50 / p99 | {ip['batch_run_p50_ms']:.2f} / "
            f"{ip['batch_run_p99_ms']:.2f} ms |",
            f"| **p99 queue wait vs max_wait_ms + p99 batch run** | **{ip['queue_wait_p99_ms']:.2f} vs "
            f"{ip['wait_bound_ms']:.2f} ms: {'met' if ip['wait_met'] else 'NOT met'}** |",
            f"| event loop lag (a 10 ms timer's lateness) p50 / p99 | {ip['loop_lag_p50_ms']:.2f} / "
            f"{ip['loop_lag_p99_ms']:.2f} ms |",
            f"| classify() latency p50 / p99 | {ip['latency_p50_ms']:.2f} / {ip['latency_p99_ms']:.2f} ms |",
            f"| timeouts / overloads / errors | {ip['timeouts']} / {ip['overloads']} / {ip['errors']} |",
            "",
            "Rounds (in-process, then offline at its mean batch; the median round is above): "
            + "; ".join(f"{x['msg_per_s']:,.0f} vs {x['offline_ref']['msg_per_s']:,.0f} msg/s "
                        f"({_pct(x['ratio'])}), p99 wait {x['queue_wait_p99_ms']:.2f} vs "
                        f"{x['wait_bound_ms']:.2f} ms" for x in rounds) + ".",
        ]
        met = sum(x["ratio"] >= 0.8 for x in rounds), sum(x["wait_met"] for x in rounds)
        verdicts.append(f"in-process {runner}: in-server >= 80% of offline in {met[0]}/{len(rounds)} "
                        f"rounds, p99 wait bound in {met[1]}/{len(rounds)}")
    if report.get("smtp"):
        sm = report["smtp"]
        rules = next(r for r in sm["runs"].values() if r["kind"] == "rules")
        lines += ["", f"## SMTP: {sm['clients']} concurrent SMTP clients -> triaged -> smtp-sink",
                  "", f"Load generator and sink scheduling: {sm['harness_sched']}"
                  + (" (SCHED_IDLE: they run on the cycles triaged leaves, as senders and a next "
                     "hop on other machines would)" if sm["harness_sched"] == "idle" else
                     " (they compete with triaged for the same cores)"),
                  "", "| classifier | msg/s | latency p50 | latency p99 | triaged CPU per msg | "
                  "loop lag p99 | client failures |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, row in sm["runs"].items():
            lines.append(f"| {name} | {row['msg_per_s']:,.0f} | {row['p50_ms']:.2f} ms | "
                         f"{row['p99_ms']:.2f} ms | {row['server_cpu_us_per_msg']:.0f} us | "
                         f"{row['loop_lag_p99_ms']:.2f} ms | {row['failures']} |")
        for name, on in sm["runs"].items():
            if on["kind"] != "onnx":
                continue
            off = on["offline_ref"]
            lines += [
                "",
                f"### {name}: the classifier inside the server vs offline at the same "
                f"batch size ({off['batch']})",
                "",
                "| metric | in-server | offline | in-server / offline |",
                "|---|---:|---:|---:|",
                f"| **classifier throughput per second of its own work** (features + model call, "
                f"wall clock) | {on['msg_per_work_s']:,.0f} msg/s | {off['msg_per_s']:,.0f} msg/s | "
                f"**{_pct(on['work_ratio'])}** (target >= 80%) |",
                f"| features, per verdict | {on['features_us_per_msg']:.0f} us | "
                f"{off['features_us_per_msg']:.0f} us | "
                f"{_pct(off['features_us_per_msg'] / max(on['features_us_per_msg'], 1e-9))} |",
                f"| model call, per verdict | {on['model_us_per_msg']:.0f} us | "
                f"{off['model_us_per_msg']:.0f} us | "
                f"{_pct(off['model_us_per_msg'] / max(on['model_us_per_msg'], 1e-9))} |",
                f"| CPU per verdict (runner's thread clock) | {on['cpu_us_per_msg']:.0f} us | "
                f"{off['cpu_us_per_msg']:.0f} us | {_pct(on['cpu_ratio'])} |",
                f"| mean batch; runner busy | {on['mean_batch']:.1f}; {on['runner_busy_pct']:.0f}% | | |",
                *([f"| inference process, per verdict: on a CPU / runnable but waiting for a core "
                   f"(/proc/PID/schedstat) | {on['runner_oncpu_us_per_msg']:.0f} / "
                   f"{on['runner_runqueue_us_per_msg']:.0f} us | | |"]
                  if "runner_runqueue_us_per_msg" in on else []),
                f"| queue wait p50 / p99 | {on['queue_wait_p50_ms']:.2f} / {on['queue_wait_p99_ms']:.2f} ms"
                " | | |",
                f"| batch run (worker's round trip) p50 / p99 | {on['batch_run_p50_ms']:.2f} / "
                f"{on['batch_run_p99_ms']:.2f} ms | | |",
                f"| **p99 queue wait vs max_wait_ms + p99 batch run** | {on['queue_wait_p99_ms']:.2f} ms | "
                f"{on['wait_bound_ms']:.2f} ms | **{'met' if on['wait_met'] else 'NOT met'}** |",
                f"| end-to-end latency added over the rules classifier, p50 / p99 | "
                f"{on['added_p50_ms']:.2f} / {on['added_p99_ms']:.2f} ms | | |",
                f"| timeouts / overloads / errors | {on['timeouts']} / {on['overloads']} / "
                f"{on['errors']} | | |",
            ]
            rows = sm["rounds"][name]
            lines += ["", "Rounds (in-server vs offline per second of work; CPU; p99 wait vs bound): "
                      + "; ".join(f"{r['msg_per_work_s']:,.0f} vs {r['offline_ref']['msg_per_s']:,.0f} "
                                  f"msg/s ({_pct(r['work_ratio'])}; CPU {_pct(r['cpu_ratio'])}; "
                                  f"{r['queue_wait_p99_ms']:.2f} vs {r['wait_bound_ms']:.2f} ms)"
                                  for r in rows) + "."]
            verdicts.append(f"SMTP {name}: classifier per second of work >= 80% of offline in "
                            f"{sum(r['work_ratio'] >= 0.8 for r in rows)}/{len(rows)} rounds "
                            f"(median {_pct(on['work_ratio'])}; on the CPU clock "
                            f"{sum(r['cpu_ratio'] >= 0.8 for r in rows)}/{len(rows)}), p99 wait bound "
                            f"in {sum(r['wait_met'] for r in rows)}/{len(rows)}")
        lines += ["", f"(rules, unpaced: {rules['msg_per_s']:,.0f} msg/s is the SMTP ceiling of this "
                  "machine with the load generator and the sink on the same cores.)"]
    lines += ["", "Verdict: " + "; ".join(verdicts) + ".", ""]
    return "\n".join(lines)


def classifier_settings(args: argparse.Namespace, model_path: Path, runner: str) -> ClassifierSettings:
    return ClassifierSettings(
        model_path=str(model_path), provider=args.provider, intra_op_num_threads=args.threads,
        timeout_ms=10_000, runner=runner,  # type: ignore[arg-type]
        batcher=BatcherSettings(max_batch_size=args.max_batch, max_wait_ms=args.max_wait_ms),
    )


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_sink":
        _aiosmtpd_sink(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_client":  # the SMTP load child
        port, clients, seconds, warmup, limit, rate = sys.argv[2:8]
        import uvloop

        row = uvloop.run(_client_load(int(port), int(clients), float(seconds), float(warmup),
                                      int(limit), float(rate)))
        print(json.dumps(row))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", default=str(REPO / "models" / "default.onnx"))
    ap.add_argument("--standin", action="store_true", help="build and use an untrained model of the default's shape")
    ap.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu")
    ap.add_argument("--runners", default="process", help="comma-separated: process, thread")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="per in-process round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--messages", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="intra_op_num_threads")
    ap.add_argument("--offline-batches", default="1,8,32,64")
    ap.add_argument("--offline-seconds", type=float, default=2.0)
    ap.add_argument("--smtp", action="store_true", help="also run the SMTP part (needs smtp-sink)")
    ap.add_argument("--smtp-seconds", type=float, default=10.0)
    ap.add_argument("--smtp-rounds", type=int, default=3)
    ap.add_argument("--harness-sched", choices=("idle", "normal"), default="idle",
                    help="scheduling class of the SMTP load generator and the sink")
    ap.add_argument("--smtp-rates", default="0,500,1000",
                    help="SMTP offered loads in msg/s, all clients together (0: as fast as "
                         "the clients can; a paced load leaves this machine's cores spare)")
    ap.add_argument("--out", help="folder for the .md and .json (default bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if not runners or not set(runners) <= {"process", "thread"}:
        raise SystemExit("--runners: process and/or thread")

    model_path = Path(args.model)
    if args.standin:
        model_path = build_standin(Path(os.environ.get("TMPDIR", "/tmp")) / "triaged-standin.onnx")
    if not model_path.exists():
        raise SystemExit(f"no model at {model_path}: pass --model or --standin")
    messages = load_messages(args.messages)

    # Offline first, on the provider the service will choose.
    model, _ = load_and_warm(str(model_path), args.provider, 0, args.threads, load_onnx_model)
    sizes = sorted({int(b) for b in args.offline_batches.split(",")})
    rows = [offline(model, messages, b, args.offline_seconds) for b in sizes]
    for row in rows:
        print(f"offline batch={row['batch']:>3}: {row['msg_per_s']:,.0f} msg/s "
              f"(model call only {row['predict_only_msg_per_s']:,.0f})", flush=True)

    # Rounds interleave the in-process run with an offline run at the batch
    # size it reached, so load from other work on a shared machine hits both;
    # the runners alternate round by round for the same reason.
    rounds: dict[str, list[dict[str, Any]]] = {r: [] for r in runners}
    for n in range(args.rounds):
        for runner in runners:
            settings = classifier_settings(args, model_path, runner)
            ip = asyncio.run(inprocess(settings, messages, args.clients, args.seconds, args.warmup))
            ref = offline(model, messages, max(1, round(ip["mean_batch"])), args.offline_seconds)
            ip["offline_ref"] = ref
            ip["ratio"] = ip["msg_per_s"] / ref["msg_per_s"]
            ip |= compare(ip, ref, args.max_wait_ms)
            print(f"round {n + 1} {runner}: {ip['msg_per_s']:,.0f} msg/s, mean batch "
                  f"{ip['mean_batch']:.1f}, offline at {ref['batch']}: {ref['msg_per_s']:,.0f} msg/s, "
                  f"ratio {_pct(ip['ratio'])}; p99 wait {ip['queue_wait_p99_ms']:.2f} vs "
                  f"{ip['wait_bound_ms']:.2f} ms", flush=True)
            rounds[runner].append(ip)
    # The round with the median ratio is the one reported in full.
    chosen = {r: sorted(xs, key=lambda x: x["ratio"])[len(xs) // 2] for r, xs in rounds.items()}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(chosen[runners[0]]["provider"]),
        "settings": {"max_batch_size": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "threads": args.threads},
        "runners": runners,
        "messages": len(messages),
        "offline": rows,
        "inprocess": chosen,
        "rounds": rounds,
        "median_ratio": {r: statistics.median(x["ratio"] for x in xs) for r, xs in rounds.items()},
    }
    if args.smtp:
        report["smtp"] = run_smtp(model_path, args, model, messages, runners)
    text = markdown(report)
    print(text)
    if not args.no_write:
        out = Path(args.out) if args.out else REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"batching_{chosen[runners[0]]['provider']}{args.tag}"
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {out / stem}.md", flush=True)
    ok = all(x["errors"] == 0 and x["timeouts"] == 0 and x["overloads"] == 0
             for xs in rounds.values() for x in xs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
