"""Milter benchmark (issue 10): Postfix with no milter, with triaged, with rspamd.

    .venv/bin/python bench/milter_bench.py                      # the recorded run
    .venv/bin/python bench/milter_bench.py -m 500 --rounds 1 --no-write   # while developing

One private Postfix 3.7 instance (tests/postfix_instance.py) relays to one
`smtp-sink -c`. It has three smtpd listeners that differ only in
`smtpd_milters`:
  plain    no milter
  triaged  triaged's milter listener, default ONNX model (process runner)
  rspamd   rspamd 3.4's proxy worker in milter mode, self-scanning, network
           checks off (../shared/TOOLING.md), one worker process
Each round sends `smtp-source -s 20 -l 4096 -m N` to each listener in turn
(order rotated per round so load from other work spreads over all three),
all rows in the same run. Two rates per row: accepted (N / smtp-source wall
time: what the SMTP client sees, milter inline) and delivered (N / time
until the sink counted all N: queue drained too). CPU per message is the
utime+stime delta of the filter's process tree (triaged with its inference
process; rspamd main and workers) over the row, divided by N; Postfix's own
tree is reported beside it. triaged's batch sizes come from its Prometheus
histogram (triaged_classifier_batch_size), diffed per row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from postfix_instance import PostfixInstance  # noqa: E402
from smtp_bench import machine, proc_tree_cpu_s  # noqa: E402
from triaged_proc import TRIAGED, free_port, wait_for_banner  # noqa: E402

TARGETS = ("plain", "triaged", "rspamd")
RSPAMD_DB = Path("/var/tmp/triaged-bench-rspamd-db")  # kept: its hyperscan cache takes a minute
# rspamd modules that would wait on DNS, Redis or the network (TOOLING.md).
RSPAMD_OFF = (
    "rbl surbl spf dkim dmarc arc asn fuzzy_check neural phishing dcc emails mx_check "
    "greylist ratelimit replies url_reputation maillist received_rbl hfilter reputation "
    "history_redis rspamd_update whitelist multimap external_services dkim_signing "
    "arc_signing bayes_expiry clickhouse elastic metadata_exporter"
).split()


@dataclass
class Row:
    target: str
    round: int
    messages: int
    accept_s: float
    deliver_s: float
    accepted_msg_per_s: float
    delivered_msg_per_s: float
    filter_cpu_ms_per_msg: float | None
    postfix_cpu_ms_per_msg: float
    batches: int | None = None
    mean_batch: float | None = None
    batch_buckets: dict[str, int] = field(default_factory=dict)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Sink:
    """One `smtp-sink -c` for the whole run; `count()` reads its running total."""

    def __init__(self) -> None:
        self.port = free_port()
        self.out = tempfile.NamedTemporaryFile(prefix="milter-bench-sink-")
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=self.out, stderr=subprocess.STDOUT,
        )
        wait_for_banner(self.port, 10, self.proc)

    def count(self) -> int:
        size = os.fstat(self.out.fileno()).st_size
        tail = os.pread(self.out.fileno(), 4096, max(0, size - 4096))
        counts = re.findall(rb"mesg=(\d+)", tail)
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        self.out.close()


class Triaged:
    def __init__(self, workdir: Path) -> None:
        self.milter_port, self.metrics_port = free_port(), free_port()
        self.workdir = workdir
        config = workdir / "triaged.toml"
        config.write_text(f"""\
[server]
hostname = "triaged.bench"

[[server.listeners]]
address = "inet:127.0.0.1:{self.milter_port}"
protocol = "milter"

[classifier]
model_path = "{REPO / 'models' / 'default.onnx'}"

[events]
jsonl_path = "{workdir / 'events.jsonl'}"
spool_dir = "{workdir / 'spool'}"

[metrics]
listen = "127.0.0.1:{self.metrics_port}"

[logging]
format = "json"
""")
        self.log = (workdir / "triaged.log").open("ab")
        self.proc = subprocess.Popen(
            [str(TRIAGED), "serve", "--config", str(config)], cwd=workdir,
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.milter_port, 120, self.proc)
        wait_for_port(self.metrics_port, 30, self.proc)

    def batch_histogram(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r'triaged_classifier_batch_size_(sum|count|bucket)(?:\{le="([^"]+)"\})? (\S+)', line)
            if m:
                key = m.group(1) if m.group(1) != "bucket" else f"le={m.group(2)}"
                out[key] = float(m.group(3))
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Rspamd:
    """rspamd 3.4 from Debian with a private LOCAL_CONFDIR (/etc/rspamd untouched)."""

    def __init__(self, workdir: Path) -> None:
        self.port, controller = free_port(), free_port()
        local = workdir / "rspamd-local"
        (local / "local.d").mkdir(parents=True)
        for name in RSPAMD_OFF:
            (local / "local.d" / f"{name}.conf").write_text("enabled = false;\n")
        (local / "local.d" / "options.inc").write_text(
            'dns { nameserver = ["127.0.0.1:53"]; timeout = 0.1s; retransmits = 0; }\n'
        )
        (local / "local.d" / "worker-proxy.inc").write_text(
            f'milter = yes;\nupstream "local" {{ default = yes; self_scan = yes; }}\n'
            f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n'
        )
        (local / "local.d" / "worker-normal.inc").write_text("enabled = false;\n")
        (local / "local.d" / "worker-fuzzy.inc").write_text("enabled = false;\n")
        (local / "local.d" / "worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{controller}";\n')
        run, logs = workdir / "rspamd-run", workdir / "rspamd-log"
        for d in (run, logs, RSPAMD_DB):
            d.mkdir(parents=True, exist_ok=True)
            subprocess.run(["chown", "-R", "_rspamd:_rspamd", str(d)], check=True)
        local.chmod(0o755)
        self.log_path = logs / "rspamd.log"
        self.vars = [f"--var=LOCAL_CONFDIR={local}", f"--var=DBDIR={RSPAMD_DB}",
                     f"--var=RUNDIR={run}", f"--var=LOGDIR={logs}"]
        self.proc = subprocess.Popen(
            ["rspamd", "-f", "-u", "_rspamd", "-g", "_rspamd", *self.vars],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 120, self.proc)

    def wait_idle(self, limit_s: float = 240.0) -> None:
        """rspamd compiles its regexp (hyperscan) cache after start: wait until
        its CPU use settles, so the rows measure scanning, not compiling."""
        deadline = time.monotonic() + limit_s
        last = proc_tree_cpu_s(self.proc.pid)
        while time.monotonic() < deadline:
            time.sleep(3)
            now = proc_tree_cpu_s(self.proc.pid)
            if now - last < 0.15:  # under 5% of a core for 3 s
                return
            last = now
        print("rspamd still busy after warm-up; measuring anyway", file=sys.stderr)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_row(target: str, rnd: int, port: int, n: int, args: argparse.Namespace, sink: Sink,
            postfix: PostfixInstance, filters: dict[str, int], triaged: Triaged | None) -> Row:
    before = sink.count()
    pf_pid = postfix.master_pid()
    assert pf_pid is not None
    hist0 = triaged.batch_histogram() if triaged and target == "triaged" else {}
    filter_pid = filters.get(target)
    cpu0 = proc_tree_cpu_s(filter_pid) if filter_pid else 0.0
    pf0 = proc_tree_cpu_s(pf_pid)
    t0 = time.monotonic()
    result = subprocess.run(
        ["smtp-source", "-s", str(args.sessions), "-l", str(args.length), "-m", str(n),
         f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=1800,
    )
    accept_s = time.monotonic() - t0
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(f"{target}: smtp-source: rc={result.returncode} {result.stderr.strip()[:2000]}")
    deadline = time.monotonic() + 600
    while sink.count() < before + n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target}: sink got {sink.count() - before} of {n}; queue: {postfix.queue()[:3]}")
        time.sleep(0.02)
    deliver_s = time.monotonic() - t0
    cpu1 = proc_tree_cpu_s(filter_pid) if filter_pid else 0.0
    pf1 = proc_tree_cpu_s(pf_pid)
    if sink.count() != before + n:
        raise RuntimeError(f"{target}: sink counted {sink.count() - before}, expected {n}")
    row = Row(
        target=target, round=rnd, messages=n, accept_s=round(accept_s, 3), deliver_s=round(deliver_s, 3),
        accepted_msg_per_s=round(n / accept_s, 1), delivered_msg_per_s=round(n / deliver_s, 1),
        filter_cpu_ms_per_msg=round((cpu1 - cpu0) * 1000 / n, 3) if filter_pid else None,
        postfix_cpu_ms_per_msg=round((pf1 - pf0) * 1000 / n, 3),
    )
    if hist0 and triaged is not None:
        hist1 = triaged.batch_histogram()
        batches = int(hist1["count"] - hist0["count"])
        row.batches = batches
        row.mean_batch = round((hist1["sum"] - hist0["sum"]) / batches, 2) if batches else None
        row.batch_buckets = {k: int(hist1[k] - hist0.get(k, 0)) for k in hist1 if k.startswith("le=")}
    return row


def summarise(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for target in TARGETS:
        mine = [r for r in rows if r.target == target]
        if not mine:
            continue
        cpu = [r.filter_cpu_ms_per_msg for r in mine if r.filter_cpu_ms_per_msg is not None]
        out[target] = {
            "accepted_msg_per_s_median": round(statistics.median(r.accepted_msg_per_s for r in mine), 1),
            "delivered_msg_per_s_median": round(statistics.median(r.delivered_msg_per_s for r in mine), 1),
            "accepted_min": min(r.accepted_msg_per_s for r in mine),
            "accepted_max": max(r.accepted_msg_per_s for r in mine),
            "filter_cpu_ms_per_msg_median": round(statistics.median(cpu), 3) if cpu else None,
            "postfix_cpu_ms_per_msg_median": round(statistics.median(r.postfix_cpu_ms_per_msg for r in mine), 3),
        }
        batches = [r.mean_batch for r in mine if r.mean_batch is not None]
        if batches:
            out[target]["mean_batch_median"] = round(statistics.median(batches), 2)
    for kind in ("accepted", "delivered"):
        key = f"{kind}_msg_per_s_median"
        if {"triaged", "rspamd", "plain"} <= out.keys():
            t, r, p = (out[x][key] for x in ("triaged", "rspamd", "plain"))
            assert t is not None and r is not None and p is not None
            out["triaged"][f"{kind}_vs_rspamd"] = round(t / r, 2)
            out["triaged"][f"{kind}_vs_plain"] = round(t / p, 2)
    return out


NAMES = {
    "plain": "(a) Postfix, no milter",
    "triaged": "(b) Postfix + triaged milter, default model",
    "rspamd": "(c) Postfix + rspamd 3.4 milter",
}


def write_markdown(path: Path, report: dict[str, object]) -> None:
    m, s, a = report["machine"], report["summary"], report["args"]
    rows = report["rows"]
    assert isinstance(m, dict) and isinstance(s, dict) and isinstance(a, dict) and isinstance(rows, list)
    lines = [
        "# Milter benchmark (issue 10)",
        "",
        f"Recorded {report['when']} by `{report['command']}` at commit `{report.get('commit', '?')}`.",
        "",
        f"Machine: `{m['hostname']}`, {m['cpu']}, {m['cpus']} CPUs shared by smtp-source, Postfix, "
        f"the filter, smtp-sink and other work on the machine; Linux {m['kernel']}, Python "
        f"{m['python']}, Postfix {m['postfix_tools']}; load average at start "
        f"{' '.join(m['loadavg_at_start'])}, at end {' '.join(report['loadavg_at_end'])}.",  # type: ignore[arg-type]
        "",
        f"Load: `smtp-source -s {a['sessions']} -l {a['length']} -m {a['messages']}` -> Postfix "
        "smtpd (milter inline) -> queue -> smtp(8) -> `smtp-sink`; "
        f"{a['rounds']} rounds, targets in rotated order, medians; every row's sink count was exact.",
        "accepted = N / smtp-source wall time; delivered = N / time until the sink had all N.",
        "",
        "| path | accepted msg/s | min-max | delivered msg/s | filter CPU ms/msg | Postfix CPU ms/msg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target, row in s.items():
        cpu = row["filter_cpu_ms_per_msg_median"]
        lines.append(
            f"| {NAMES[target]} | {row['accepted_msg_per_s_median']:.0f} | "
            f"{row['accepted_min']:.0f}-{row['accepted_max']:.0f} | "
            f"{row['delivered_msg_per_s_median']:.0f} | {'—' if cpu is None else f'{cpu:.3f}'} | "
            f"{row['postfix_cpu_ms_per_msg_median']:.3f} |"
        )
    t = s.get("triaged", {})
    if "accepted_vs_rspamd" in t:
        lines += [
            "",
            f"- (b)/(c): **{t['accepted_vs_rspamd']:.2f}x** accepted, {t['delivered_vs_rspamd']:.2f}x "
            "delivered (target >= 1.5x).",
            f"- (b)/(a): **{t['accepted_vs_plain']:.2f}x** accepted, {t['delivered_vs_plain']:.2f}x "
            "delivered (target >= 0.6x).",
        ]
    lines += ["", "Batches triaged formed (from `triaged_classifier_batch_size`, per row):", "",
              "| round | batches | mean size | size histogram (upper bound: batches) |", "|---|---:|---:|---|"]
    for r in rows:
        if r["target"] != "triaged":
            continue
        prev = 0
        hist = []
        for k, v in r["batch_buckets"].items():
            if v - prev:
                hist.append(f"<={k[3:]}: {v - prev}")
            prev = v
        lines.append(f"| {r['round']} | {r['batches']} | {r['mean_batch']} | {', '.join(hist)} |")
    lines += [
        "",
        "CPU ms/msg: utime+stime of the process tree from /proc/PID/stat over the row (from "
        "smtp-source start to the last delivery) divided by N; triaged's tree includes its "
        "inference process, rspamd's its main process and its one proxy worker (self-scanning). "
        "rspamd runs with the network-bound modules off (../shared/TOOLING.md) after its "
        "regexp cache settled; triaged with its defaults (ONNX model, process runner, "
        "max_batch_size 64, max_wait_ms 2).",
        "Raw rows: `milter.json` beside this file.",
        "",
    ]
    path.write_text("\n".join(lines))


def _git_commit() -> str:
    result = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                            capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-m", "--messages", type=int, default=5000)
    parser.add_argument("-s", "--sessions", type=int, default=20)
    parser.add_argument("-l", "--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=500, help="messages per target before round 1")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    report: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["bench/milter_bench.py", *sys.argv[1:]]),
        "commit": _git_commit(),
        "machine": machine(),
        "args": {"messages": args.messages, "sessions": args.sessions, "length": args.length,
                 "rounds": args.rounds, "warmup": args.warmup},
    }
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="triaged-milter-bench-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        sink = Sink()
        triaged = rspamd = postfix = None
        try:
            triaged = Triaged(workdir)
            rspamd = Rspamd(workdir)
            ports = {t: free_port() for t in TARGETS}
            milters = {"plain": "", "triaged": f"inet:127.0.0.1:{triaged.milter_port}",
                       "rspamd": f"inet:127.0.0.1:{rspamd.port}"}
            master = [f"127.0.0.1:{ports[t]} inet n - n - - smtpd -o smtpd_milters={milters[t]}"
                      for t in TARGETS]
            postfix = PostfixInstance(sink.port, master_cf=master, main_cf={
                "milter_protocol": "6",
                "milter_default_action": "tempfail",
                "milter_content_timeout": "60s",
                "non_smtpd_milters": "",
                "default_process_limit": "200",
                "smtpd_client_connection_count_limit": "0",
                "smtpd_client_connection_rate_limit": "0",
            }).start()
            for t in TARGETS:
                wait_for_banner(ports[t], 30)
            rspamd.wait_idle()
            filters = {"triaged": triaged.proc.pid, "rspamd": rspamd.proc.pid}
            for t in TARGETS:  # warm-up: caches, connections, the model's first batches
                one_row(t, 0, ports[t], args.warmup, args, sink, postfix, filters, triaged)
            postfix.wait_queue_empty(120)
            for rnd in range(1, args.rounds + 1):
                order = TARGETS[rnd % 3:] + TARGETS[: rnd % 3]
                for t in order:
                    row = one_row(t, rnd, ports[t], args.messages, args, sink, postfix, filters, triaged)
                    rows.append(row)
                    cpu = row.filter_cpu_ms_per_msg
                    print(f"round {rnd} {t:8s} accepted {row.accepted_msg_per_s:7.1f} msg/s  "
                          f"delivered {row.delivered_msg_per_s:7.1f} msg/s  filter cpu "
                          f"{'-' if cpu is None else f'{cpu:.3f}'} ms/msg  postfix cpu "
                          f"{row.postfix_cpu_ms_per_msg:.3f}"
                          + (f"  batches {row.batches} mean {row.mean_batch}" if row.batches else ""),
                          flush=True)
        finally:
            for part in (postfix, triaged, rspamd):
                if part is not None:
                    try:
                        part.close() if isinstance(part, PostfixInstance) else part.stop()
                    except Exception as exc:
                        print(f"stopping {type(part).__name__}: {exc}", file=sys.stderr)
            sink.stop()
    report["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report["rows"] = [asdict(r) for r in rows]
    report["summary"] = summarise(rows)
    print(json.dumps(report["summary"], indent=2))
    if not args.no_write:
        out = BENCH / "results"
        out.mkdir(exist_ok=True)
        (out / "milter.json").write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(out / "milter.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
