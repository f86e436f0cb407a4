"""Twenty concurrent 20 MiB messages through `triaged serve` (issue 9, finding 7).

    .venv/bin/python bench/big_messages.py                  # the recorded run
    .venv/bin/python bench/big_messages.py --tree before=/tmp/old --tree after=.  # two checkouts
    .venv/bin/python bench/big_messages.py --count 4 --size-mib 4 --no-write   # while developing

Starts the real `triaged serve` (the bundled model, inference process, the
shipped defaults: timeout_ms 2000, max_inflight_data_bytes 512 MiB) in front
of a lean capture sink, sends `--count` messages of `--size-mib` at once over
SMTP (one connection each), and samples the RSS of triaged plus its
inference process(es) from /proc every 10 ms. It reports:

- how many were accepted, delivered, stamped by the model, stamped by the
  header-rules fallback, unstamped, and delivered byte-identical below our
  headers;
- the peak of the summed RSS above idle (the summed RSS after start-up and a
  warm-up message), against the acceptance bound 1.5 x
  max_inflight_data_bytes; each process's own peak; what is left above idle
  3 s after the last reply.

The message: a short text part and a base64 attachment (random bytes), like
a mail with a large file. The sink and the clients run in this process (not
measured): the sink keeps a hash of each message, not the message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

from triaged_proc import TRIAGED, free_port, wait_for_banner  # noqa: E402

MIB = 1 << 20
MAX_INFLIGHT = 512 * MIB  # the shipped default (config/triaged.toml)
FALLBACK_MODEL = "rules-fallback/1"
ID_MARK = b"Message-ID: <big-"


# -- the capture sink: hashes, not messages ---------------------------------------


@dataclass
class Received:
    stamp_fields: dict[str, str]  # our header fields above the original message
    sha256: str  # of the message from its Message-ID line on (the original's first line)
    size: int


class HashSink:
    """A next hop that answers 250 and keeps, per message, our header fields
    and a hash of everything below them. Runs its own loop in a thread."""

    def __init__(self) -> None:
        self.received: dict[str, Received] = {}
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HashSink:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", 0, limit=1 << 27)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 200000000\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    self._keep(await reader.readuntil(b"\r\n.\r\n"))
                    writer.write(b"250 2.0.0 Ok: hashed\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _keep(self, raw: bytes) -> None:
        data = (b"\r\n" + raw).replace(b"\r\n..", b"\r\n.")[2:-3]
        at = data.find(ID_MARK)
        ours: dict[str, str] = {}
        for line in data[: max(at, 0)].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name:
                ours[name.decode().lower()] = value.strip().decode()
        end = data.find(b"@", at)
        key = data[at + len(ID_MARK) : end].decode() if at >= 0 else f"?{len(self.received)}"
        self.received[key] = Received(ours, hashlib.sha256(data[max(at, 0):]).hexdigest(),
                                      len(data))

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# -- the messages -------------------------------------------------------------------


def attachment(size: int) -> bytes:
    """A base64 body of about `size` bytes in 76-character lines."""
    raw = base64.encodebytes(os.urandom(size * 3 // 4))  # LF lines of 76
    return raw.replace(b"\n", b"\r\n")


def message(n: int, body: bytes) -> tuple[bytes, bytes]:
    """(head, body): the message is head + body; only the head differs per message."""
    head = (
        f"Message-ID: <big-{n}@bench.example>\r\n"
        f"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
        f"Subject: the report you asked for ({n})\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="b0undary"\r\n\r\n'
        f"--b0undary\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Hi Bob, the full report is attached. See you at lunch tomorrow.\r\n\r\n"
        f"--b0undary\r\nContent-Type: application/pdf\r\n"
        f'Content-Disposition: attachment; filename="report-{n}.pdf"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    return head, body


TAIL = b"--b0undary--\r\n"


async def send(port: int, head: bytes, body: bytes) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> tuple[int, str]:
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 120)
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode(errors="replace").strip()

    try:
        await reply()
        for cmd in (b"EHLO bench.example", b"MAIL FROM:<alice@example.org>",
                    b"RCPT TO:<bob@example.net>", b"DATA"):
            writer.write(cmd + b"\r\n")
            code, text = await reply()
            if code >= 400:
                return code, text
        # No line starts with "." in these messages: nothing to stuff.
        for part in (head, body, b".\r\n"):
            writer.write(part)
            await writer.drain()
        return await reply()
    finally:
        writer.close()


# -- memory -------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rss(pid: int) -> int:
    """Resident bytes of `pid` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Sampler:
    """Samples RSS of a process and its children every `every_s` in a thread."""

    pid: int
    every_s: float = 0.01
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, parent, children)
    peak_parent: int = 0
    peak_children: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _kids: list[int] = field(default_factory=list)

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if n % 50 == 0:
                self._kids = children(self.pid)  # a restarted inference process too
            parent, kids = rss(self.pid), sum(rss(k) for k in self._kids)
            self.samples.append((time.monotonic(), parent, kids))
            self.peak_parent = max(self.peak_parent, parent)
            self.peak_children = max(self.peak_children, kids)
            n += 1
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def total_between(self, t0: float, t1: float) -> list[int]:
        return [p + c for t, p, c in self.samples if t0 <= t <= t1]


# -- one run ---------------------------------------------------------------------


@dataclass
class Result:
    tree: str
    count: int
    size_mib: float
    max_inflight_data_bytes: int
    accepted: int
    refused: list[str]
    delivered: int
    stamped_model: int
    stamped_fallback: int
    unstamped: int
    byte_identical: int
    model: str
    wall_s: float
    load_avg_1m: float  # of the machine as the messages were sent (other work shares it)
    idle_rss_mib: float
    peak_above_idle_mib: float
    bound_mib: float
    within_bound: bool
    peak_triaged_mib: float
    peak_inference_mib: float
    left_above_idle_mib: float


def config(port: int, sink_port: int, workdir: Path) -> str:
    return f"""\
[server]
hostname = "bench.example"

[[server.listeners]]
address = "127.0.0.1:{port}"

[upstream]
url = "smtp://127.0.0.1:{sink_port}"

[classifier]
kind = "onnx"
model_path = "{REPO / "models" / "default.onnx"}"
provider = "cpu"
runner = "process"

[events]
jsonl_path = "{workdir / "events.jsonl"}"
spool_dir = "{workdir / "spool"}"

[logging]
format = "json"
level = "warning"
"""


def run(label: str, tree: Path, count: int, size_mib: float, env_extra: dict[str, str]) -> Result:
    body = attachment(int(size_mib * MIB))
    msgs = [message(n, body) for n in range(count)]
    expected = {str(n): hashlib.sha256(h + b + TAIL).hexdigest() for n, (h, b) in enumerate(msgs)}
    sink = HashSink().start()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="big-messages-") as tmp:
        work = Path(tmp)
        (work / "triaged.toml").write_text(config(port, sink.port, work))
        log = (work / "triaged.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1", **env_extra}
        proc = subprocess.Popen([str(TRIAGED), "serve", "--config", str(work / "triaged.toml")],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        try:
            wait_for_banner(port, 60, proc)
            # Warm up: one small message through the model, then measure idle.
            warm_head, warm_body = message(-1, attachment(4096))
            warm = asyncio.run(send(port, warm_head, warm_body + TAIL))
            assert warm[0] == 250, warm
            sampler.start()
            time.sleep(1.5)
            t_idle = time.monotonic()
            idle = sampler.total_between(t_idle - 1.0, t_idle)
            idle_rss = sorted(idle)[len(idle) // 2]

            async def all_at_once() -> list[tuple[int, str]]:
                return await asyncio.gather(*(send(port, h, b + TAIL) for h, b in msgs))

            load = os.getloadavg()[0]
            t0 = time.monotonic()
            replies = asyncio.run(all_at_once())
            wall = time.monotonic() - t0
            time.sleep(3.0)
            t_end = time.monotonic()
            sampler.stop()
            during = sampler.total_between(t0, t_end)
            after = sampler.total_between(t_end - 0.5, t_end)
        finally:
            sampler.stop()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            sink.stop()
    received = {k: v for k, v in sink.received.items() if k != "-1"}
    models = [r.stamp_fields.get("x-triage-model", "") for r in received.values()]
    model_names = sorted({m for m in models if m and m != FALLBACK_MODEL})
    peak_above = max(during) - idle_rss
    return Result(
        tree=label,
        count=count,
        size_mib=size_mib,
        max_inflight_data_bytes=MAX_INFLIGHT,
        accepted=sum(code == 250 for code, _ in replies),
        refused=[f"{code} {text}" for code, text in replies if code != 250],
        delivered=len(received),
        stamped_model=sum(1 for m in models if m and m != FALLBACK_MODEL),
        stamped_fallback=models.count(FALLBACK_MODEL),
        unstamped=models.count(""),
        byte_identical=sum(expected.get(k) == r.sha256 for k, r in received.items()),
        model=",".join(model_names),
        wall_s=round(wall, 2),
        load_avg_1m=round(load, 2),
        idle_rss_mib=round(idle_rss / MIB, 1),
        peak_above_idle_mib=round(peak_above / MIB, 1),
        bound_mib=round(1.5 * MAX_INFLIGHT / MIB, 1),
        within_bound=peak_above <= 1.5 * MAX_INFLIGHT,
        peak_triaged_mib=round(sampler.peak_parent / MIB, 1),
        peak_inference_mib=round(sampler.peak_children / MIB, 1),
        left_above_idle_mib=round((sorted(after)[len(after) // 2] - idle_rss) / MIB, 1),
    )


def report(results: list[Result]) -> str:
    r0 = results[0]
    lines = [
        "# Twenty concurrent large messages (issue 9, finding 7)",
        "",
        f"`bench/big_messages.py`: {r0.count} messages of {r0.size_mib:g} MiB sent at once "
        "(one SMTP connection each) to `triaged serve` with the bundled model on its "
        "inference process and the shipped defaults (`timeout_ms = 2000`, "
        f"`max_inflight_data_bytes` = {r0.max_inflight_data_bytes // MIB} MiB), relaying to a "
        "capture sink that keeps a hash of each message. RSS of triaged and its inference "
        "process summed, sampled from /proc every 10 ms; idle = the sum after start-up and "
        "one warm-up message. Acceptance: all stamped by the model, peak at most "
        "1.5 x max_inflight_data_bytes above idle.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other work), "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| tree | accepted | stamped by model | by fallback | unstamped | byte-identical | "
        "wall s | load | idle MiB | peak above idle MiB | bound MiB | within | peak triaged MiB | "
        "peak inference MiB | left above idle after 3 s MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.tree} | {r.accepted}/{r.count} | {r.stamped_model} | {r.stamped_fallback} | "
            f"{r.unstamped} | {r.byte_identical} | {r.wall_s} | {r.load_avg_1m} | {r.idle_rss_mib} | "
            f"{r.peak_above_idle_mib} | {r.bound_mib} | {'yes' if r.within_bound else 'NO'} | "
            f"{r.peak_triaged_mib} | {r.peak_inference_mib} | {r.left_above_idle_mib} |"
        )
    lines += [
        "",
        "Each row is one run (rounds interleave the trees). \"stamped by model\" counts "
        "messages whose X-Triage-Model is the model's; \"by fallback\": stamped "
        "rules-fallback/1 after the model missed its deadline. The load column is the "
        "machine's 1-minute load average when the messages were sent: other work shares "
        "these cores, and deadlines are missed under it.",
    ]
    for r in results:
        if r.refused:
            lines.append(f"\nRefused ({r.tree}): " + "; ".join(sorted(set(r.refused))))
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--size-mib", type=float, default=20.0)
    ap.add_argument("--tree", action="append", metavar="[LABEL=]PATH",
                    help="checkout(s) whose proxy/ and classifier/ triaged runs (default: this one)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per tree, interleaved")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in triaged's environment (e.g. MALLOC_MMAP_THRESHOLD_=131072)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "big_messages")
    args = ap.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    trees = [(t.partition("=")[0], Path(t.partition("=")[2])) if "=" in t else (t, Path(t))
             for t in (args.tree or [str(REPO)])]
    results = [run(label, path.resolve(), args.count, args.size_mib, env)
               for _ in range(args.rounds) for label, path in trees]
    text = report(results)
    print(text)
    if not args.no_write:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps([asdict(r) for r in results], indent=2) + "\n"
        )
    return 0 if all(r.within_bound and r.stamped_model == r.count for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
