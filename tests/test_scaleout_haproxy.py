"""Scale-out acceptance: a real HAProxy in front of two `triaged serve`
processes, one of them SIGKILLed in the middle of the run.

    20 SMTP sessions from 127.0.0.77
      -> HAProxy (config/haproxy.cfg as shipped, with this test's ports:
         mode tcp, send-proxy-v2, health checks GET /readyz on each
         instance's metrics port)
      -> triaged t1, t2 (separate processes, PROXY listeners, own events file)
      -> one capture sink

2,000 uniquely numbered messages (tests/ledger.py). The rule, what an SMTP
client may rely on (RFC 5321 4.1.1.4, 6.1):

- every message the client saw accepted with 250 is at the sink exactly
  once, byte-identical below our stamp;
- every other message got a 4xx, or lost its connection before any final
  reply. A lost connection is "not accepted": the sending MTA keeps the
  message and retries. It may be at the sink already (the instance died
  after the next hop said 250, before the 250 reached the client); that is
  SMTP's known duplicate window, allowed once, as after a 4xx. Drops happen
  only to transactions in flight on the killed instance when it died: at
  most one per session, all around the kill;
- no 5xx, nothing at the sink twice, nothing at the sink nobody sent.

And the original client address (127.0.0.77, not HAProxy's 127.0.0.1)
reaches the events of both instances.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Captured, CaptureServer
from ledger import Ledger, NoReply, Refused, SmtpConn, say_quit, transact
from triaged_proc import REPO, TriagedProcess, free_port
from waiting import wait_until_blocking

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy not installed (.ci/run installs it)"
)

CLIENT_ADDRESS = "127.0.0.77"
MESSAGES = 2000
SESSIONS = 20
KILL_AFTER = 600  # final replies seen before t1 is killed
_MID = re.compile(rb"(?mi)^Message-ID:[ \t]*<([^>\r\n]+)>")
_SERVER = re.compile(r"(?m)^(\s*server t(\d+)) \S+ send-proxy-v2 check port \d+$")


def haproxy_config(front: int, stats: Path, backends: list[tuple[int, int]]) -> str:
    """The shipped recipe (config/haproxy.cfg), pointed at this test's ports,
    with checks every 200 ms instead of 2 s, and a maxconn this sandbox's
    file limit allows."""
    text = (REPO / "config" / "haproxy.cfg").read_text()
    # Each backend's `server tN ADDR ... check port P` line, at this test's ports.
    def server(m: re.Match[str]) -> str:
        smtp, metrics = backends[int(m.group(2)) - 1]
        return f"{m.group(1)} 127.0.0.1:{smtp} send-proxy-v2 check port {metrics}"

    text, servers = _SERVER.subn(server, text)
    assert servers == 2 * len(backends), f"config/haproxy.cfg: {servers} server lines"
    for old, new in (("bind :25", f"bind 127.0.0.1:{front}"),
                     ("stats socket /run/haproxy/admin.sock", f"stats socket {stats}"),
                     ("inter 2s", "inter 200ms"),
                     ("maxconn 20000", "maxconn 1000")):
        assert old in text, f"config/haproxy.cfg no longer has {old!r}"
        text = text.replace(old, new)
    return text


def server_states(stats: Path, backend: str = "triaged") -> dict[str, str]:
    """HAProxy's view of one backend: {"t1": "UP", ...} from `show stat` on the stats socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == backend and row.get("svname", "").startswith("t"):
            out[row["svname"]] = row["status"]
    return out


def instance(capture_url: str, workdir: Path, classifier: str = 'kind = "rules"') -> tuple[TriagedProcess, int, int]:
    """A triaged with a plain listener (for the start-up banner check), a
    PROXY listener behind HAProxy and its own metrics port."""
    workdir.mkdir()
    proxy_port, metrics_port = free_port(), free_port()
    t = TriagedProcess(
        capture_url,
        workdir=workdir,
        sections={
            "listener": f'\n[[server.listeners]]\naddress = "127.0.0.1:{proxy_port}"\nproxy_protocol = true',
            "events": "linger_ms = 10.0",
            "classifier": classifier,
        },
        extra_toml=f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )
    return t, proxy_port, metrics_port


def events_of(t: TriagedProcess) -> list[dict[str, object]]:
    path = t.workdir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Balanced:
    """Two triaged instances behind a running HAProxy (the shipped recipe)."""

    t1: TriagedProcess
    t2: TriagedProcess
    front: int  # HAProxy's SMTP port
    stats: Path  # its stats socket
    haproxy: subprocess.Popen[bytes]
    log: Path

    async def wait_for(self, states: dict[str, dict[str, str]], what: str) -> None:
        """Until HAProxy's view of each backend is `states` ({backend: {server: status}})."""

        def reached() -> bool:
            assert self.haproxy.poll() is None, self.log.read_text()
            return self.stats.exists() and all(server_states(self.stats, b) == s for b, s in states.items())

        await asyncio.to_thread(wait_until_blocking, reached, 30.0, interval=0.1, what=what)


@asynccontextmanager
async def balanced(tmp_path: Path, capture: CaptureServer, classifier: str = 'kind = "rules"') -> AsyncIterator[Balanced]:
    t1, p1, m1 = instance(capture.url, tmp_path / "t1", classifier)
    t2, p2, m2 = instance(capture.url, tmp_path / "t2", classifier)
    front, stats = free_port(), tmp_path / "haproxy.sock"
    cfg, log = tmp_path / "haproxy.cfg", tmp_path / "haproxy.log"
    cfg.write_text(haproxy_config(front, stats, [(p1, m1), (p2, m2)]))
    haproxy: subprocess.Popen[bytes] | None = None
    try:
        # Started in threads: the capture sink runs on this loop and must answer meanwhile.
        await asyncio.gather(asyncio.to_thread(t1.start), asyncio.to_thread(t2.start))
        await asyncio.to_thread(subprocess.run, ["haproxy", "-c", "-q", "-f", str(cfg)], check=True)
        with log.open("wb") as out:
            haproxy = await asyncio.to_thread(subprocess.Popen, ["haproxy", "-db", "-f", str(cfg)],
                                              stdout=out, stderr=subprocess.STDOUT)
        yield Balanced(t1, t2, front, stats, haproxy, log)
    finally:
        if haproxy is not None:
            haproxy.send_signal(signal.SIGTERM)
            haproxy.wait(timeout=10)
        t1.close()
        t2.close()


# The client side's loop is not what is under test (the instances run uvloop): one variant.
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_haproxy_two_instances_one_killed(tmp_path: Path, capture: CaptureServer) -> None:
    delivered: list[bytes] = []

    def on_message(m: Captured) -> None:
        delivered.append(m.data)

    capture.on_message = on_message
    async with balanced(tmp_path, capture) as rig:
        t1, t2, front, stats = rig.t1, rig.t2, rig.front, rig.stats
        await rig.wait_for({"triaged": {"t1": "UP", "t2": "UP"}}, "both instances UP in HAProxy (/readyz checks)")

        ledger = Ledger()
        finished = 0
        kill_at: float | None = None
        killed = asyncio.Event()

        async def session() -> None:
            nonlocal finished
            conn: SmtpConn | None = None
            while len(ledger.entries) < MESSAGES:
                if conn is None:
                    try:
                        conn = await SmtpConn.open("127.0.0.1", front, timeout_s=30, local_addr=CLIENT_ADDRESS)
                    except (Refused, NoReply):
                        await asyncio.sleep(0.05)  # as an MTA would: later
                        continue
                entry = ledger.new(1024)
                carry_on = await transact(conn, entry)
                finished += 1
                if finished == KILL_AFTER:
                    killed.set()
                if not carry_on or entry.code != 250:
                    await conn.close()
                    conn = None
            if conn is not None:
                await say_quit(conn)
                await conn.close()

        async def killer() -> None:
            nonlocal kill_at
            await killed.wait()
            kill_at = time.monotonic()
            t1.signal(signal.SIGKILL)

        started = time.monotonic()
        await asyncio.gather(killer(), *(session() for _ in range(SESSIONS)))
        took = time.monotonic() - started
        assert kill_at is not None
        assert t1.proc is not None and t1.proc.wait(10) == -signal.SIGKILL
        states = await asyncio.to_thread(server_states, stats)
        assert states == {"t1": "DOWN", "t2": "UP"}, states  # the health check noticed

        # The sink: wait for the last replies' deliveries (they precede the 250s anyway).
        report = ledger.check(delivered)
        assert report.sent == MESSAGES
        summary = report.summary()
        # 250 -> exactly once and intact; nothing phantom; no 5xx, nothing refused delivered.
        assert not report.lost and not report.duplicated and not report.altered, summary
        assert not report.phantom and report.foreign == 0 and report.rejected == 0, summary
        assert not report.delivered_after_reject, summary
        # Nothing at the sink twice, whatever the client was told.
        copies = Counter(
            m.group(1) for m in (_MID.search(d) for d in delivered) if m is not None
        )
        assert [mid for mid, n in copies.items() if n > 1] == []
        # Not accepted: a 4xx, or a drop of a transaction in flight when t1 died.
        drops = [e for e in ledger.entries.values() if e.code is None]
        assert len(drops) <= SESSIONS, summary
        for e in drops:
            ended = e.created + e.latency_s
            assert e.created <= kill_at + 5 and ended >= kill_at - 0.5, (e.mid, e.failure, summary)
            assert "timeout" not in e.failure, (e.mid, e.failure)
        others = Counter(e.code for e in ledger.entries.values() if e.code not in (None, 250))
        assert all(400 <= code < 500 for code in others), others
        # Most mail went through, before and after the kill.
        assert report.accepted >= MESSAGES - 2 * SESSIONS, summary
        after_kill = [e for e in ledger.entries.values() if e.code == 250 and e.created > kill_at]
        assert after_kill, "nothing accepted after the kill"

        # The original client address reached both instances' events.
        for t in (t1, t2):
            addresses = Counter(str(ev["client_address"]) for ev in events_of(t))
            assert addresses and set(addresses) == {CLIENT_ADDRESS}, (t.workdir.name, addresses)
        print(f"scale-out: {summary} drops={len(drops)} took={took:.1f}s")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_haproxy_every_instance_degraded_keeps_mail_flowing(tmp_path: Path, capture: CaptureServer) -> None:
    """Both instances alive but not ready (their shared inference service is
    unreachable, so /readyz is 503): the recipe's `triaged_live` backend
    (GET /healthz) takes the mail, stamped by the header rules, instead of
    HAProxy refusing every session."""
    delivered: list[bytes] = []
    capture.on_message = lambda m: delivered.append(m.data)
    unreachable = f'kind = "onnx"\nrunner = "service"\nendpoint = "unix:{tmp_path}/no-inference.sock"'
    async with balanced(tmp_path, capture, unreachable) as rig:
        front = rig.front
        await rig.wait_for({"triaged": {"t1": "DOWN", "t2": "DOWN"}, "triaged_live": {"t1": "UP", "t2": "UP"}},
                           "/readyz DOWN and /healthz UP on both instances")
        ledger = Ledger()

        async def session() -> None:
            conn = await SmtpConn.open("127.0.0.1", front, timeout_s=30, local_addr=CLIENT_ADDRESS)
            for _ in range(10):
                entry = ledger.new(512)
                assert await transact(conn, entry) and entry.code == 250, (entry.code, entry.failure)
            await conn.cmd(b"QUIT")
            await conn.close()

        await asyncio.gather(*(session() for _ in range(4)))
        report = ledger.check(delivered)
        assert report.accepted == 40 and not report.lost and not report.duplicated, report.summary()
        assert all(b"X-Triage-Model: rules-fallback/1" in d for d in delivered)
