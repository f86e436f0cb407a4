"""/healthz, /readyz and the systemd watchdog on a real running server.

Liveness is judged from a heartbeat the loop stamps, read by the HTTP
thread, so a deliberately blocked loop must turn /healthz to 503 while it is
blocked. Readiness follows the next hop and the classifier both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import CaptureServer, SmtpTestClient, base_settings
from triaged_proc import REPO, TriagedProcess
from waiting import wait_until

from classifier.rules import RulesClassifier
from classifier.types import Classification
from proxy.health import HealthTiming, watchdog_healthy, watchdog_interval_s, watchdog_loop
from proxy.server import Server, sd_notify

FAST = HealthTiming(heartbeat_s=0.05, stale_after_s=1.0, check_every_s=0.05, ping_timeout_s=0.5,
                    upstream_every_s=0.1, upstream_timeout_s=1.0)


class SwitchableClassifier(RulesClassifier):
    """The rules, with the ONNX service's health surface: a model that can be
    "not loaded" and an inference side that can stop answering its ping."""

    def __init__(self) -> None:
        self.loaded = True
        self.answering = True
        self.pings = 0

    @property
    def model_name(self) -> str | None:
        return "switchable/1" if self.loaded else None

    async def ping(self) -> bool:
        self.pings += 1
        if not self.answering:
            await asyncio.sleep(3600)  # hung: the monitor's timeout decides
        return True

    async def classify(self, raw: bytes) -> Classification:
        return self.classify_now(raw)


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def aget(port: int, path: str) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(get, port, path)


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(capture: CaptureServer) -> AsyncIterator[StartServer]:
    started: list[Server] = []

    async def start(classifier: Any = None, upstream_url: str | None = None) -> Server:
        settings = base_settings(upstream_url or capture.url, metrics={"listen": "127.0.0.1:0"})
        srv = Server(settings, classifier=classifier, health_timing=FAST)
        await srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop(drain_timeout_s=1.0)


async def status_becomes(port: int, path: str, status: int) -> dict[str, Any]:
    seen: list[tuple[int, dict[str, Any]]] = []

    async def poll() -> bool:
        seen.append(await aget(port, path))
        return seen[-1][0] == status

    deadline = time.monotonic() + 30
    while not await poll():
        assert time.monotonic() < deadline, f"{path} never {status}: last {seen[-1]}"
        await asyncio.sleep(0.05)
    return seen[-1][1]


async def test_healthz_and_readyz_on_a_running_server(start_server: StartServer) -> None:
    srv = await start_server()
    port = srv.metrics_port
    assert port is not None
    body = await status_becomes(port, "/readyz", 200)
    assert body["ready"] is True and body["alive"] is True and body["reasons"] == []
    assert body["model"] == RulesClassifier.model
    code, body = await aget(port, "/healthz")
    assert code == 200 and body["alive"] is True and body["pid"] == os.getpid()
    # /metrics still serves the exposition beside them.
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert "triaged_connections_open" in text


async def test_readyz_follows_the_next_hop(start_server: StartServer, capture: CaptureServer) -> None:
    srv = await start_server()
    port = srv.metrics_port
    assert port is not None
    await status_becomes(port, "/readyz", 200)
    hop_port = capture.port
    await capture.kill()
    body = await status_becomes(port, "/readyz", 503)
    assert any(r.startswith(f"upstream 127.0.0.1:{hop_port} unreachable") for r in body["reasons"]), body
    assert body["alive"] is True
    assert (await aget(port, "/healthz"))[0] == 200  # alive all along: only not ready
    await capture.start(hop_port)
    await status_becomes(port, "/readyz", 200)


async def test_readyz_follows_the_maildir(start_server: StartServer, tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    srv = await start_server(upstream_url=f"maildir:{maildir}")
    assert srv.metrics_port is not None
    await status_becomes(srv.metrics_port, "/readyz", 200)
    if os.geteuid() == 0:
        # root writes anywhere: take the directory away instead of its mode
        (maildir / "tmp").rename(tmp_path / "gone")
        body = await status_becomes(srv.metrics_port, "/readyz", 503)
        (tmp_path / "gone").rename(maildir / "tmp")
    else:
        (maildir / "tmp").chmod(0o500)
        body = await status_becomes(srv.metrics_port, "/readyz", 503)
        (maildir / "tmp").chmod(0o700)
    assert any("not writable" in r for r in body["reasons"]), body
    await status_becomes(srv.metrics_port, "/readyz", 200)


async def test_readyz_with_the_real_model_and_inference_process(capture: CaptureServer) -> None:
    """The ONNX service's own model_name and ping(): ready once the inference
    process has loaded the bundled model; a process killed between batches is
    restarted by the next batch, so the service still counts as answering."""
    import signal

    from classifier.config import ClassifierSettings

    settings = base_settings(capture.url, metrics={"listen": "127.0.0.1:0"})
    model = REPO / "models" / "default.onnx"
    settings = msgspec.structs.replace(settings, classifier=ClassifierSettings(
        kind="onnx", model_path=str(model), provider="cpu", runner="process"))
    srv = Server(settings, health_timing=FAST)
    await srv.start()
    try:
        assert srv.metrics_port is not None
        body = await status_becomes(srv.metrics_port, "/readyz", 200)
        assert body["model"] == srv.classifier.model_name and body["classifier_ok"] is True  # type: ignore[attr-defined]
        pid = srv.classifier.runner.pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        assert (await aget(srv.metrics_port, "/readyz"))[0] == 200
    finally:
        await srv.stop(drain_timeout_s=1.0)


async def test_readyz_follows_the_model_and_the_inference_side(start_server: StartServer) -> None:
    classifier = SwitchableClassifier()
    srv = await start_server(classifier=classifier)
    port = srv.metrics_port
    assert port is not None
    await status_becomes(port, "/readyz", 200)
    classifier.loaded = False
    body = await status_becomes(port, "/readyz", 503)
    assert "model not loaded" in body["reasons"] and body["model"] is None
    classifier.loaded = True
    await status_becomes(port, "/readyz", 200)
    classifier.answering = False  # pings hang past ping_timeout_s
    body = await status_becomes(port, "/readyz", 503)
    assert "inference service not answering" in body["reasons"]
    assert (await aget(port, "/healthz"))[0] == 200
    classifier.answering = True
    await status_becomes(port, "/readyz", 200)


async def test_a_blocked_loop_fails_healthz_while_it_is_blocked(start_server: StartServer) -> None:
    srv = await start_server()
    port = srv.metrics_port
    assert port is not None
    await status_becomes(port, "/healthz", 200)
    seen: list[tuple[int, dict[str, Any]]] = []
    released = threading.Event()

    def watch() -> None:
        # From another thread, while the loop is stuck: poll until 503.
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                seen.append(get(port, "/healthz"))
                if seen[-1][0] == 503:
                    return
                time.sleep(0.05)
        finally:
            released.set()

    loop = asyncio.get_running_loop()
    watcher = loop.run_in_executor(None, watch)
    # Block the loop (as a CPU-bound callback would) until the watcher saw 503.
    loop.call_soon(released.wait, 40)
    await watcher
    assert seen and seen[-1][0] == 503, seen[-3:]
    body = seen[-1][1]
    assert body["alive"] is False and body["ready"] is False
    assert body["reasons"][0].startswith("event loop unresponsive for")
    await status_becomes(port, "/healthz", 200)  # and back once the loop runs again


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval_s({}, 10) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 10) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000"}, 10) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "10"}, 10) == 10.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "11"}, 10) is None


def notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


async def test_watchdog_only_while_loop_and_classifier_answer(start_server: StartServer, tmp_path: Path) -> None:
    classifier = SwitchableClassifier()
    srv = await start_server(classifier=classifier)
    path = tmp_path / "notify"
    sock = notify_socket(path)
    task = asyncio.create_task(watchdog_loop(
        lambda: watchdog_healthy(srv.health.snapshot()), lambda m: sd_notify(m, str(path)), 0.05))
    try:
        await wait_until(lambda: drain(sock), what="a first WATCHDOG=1")
        # A next hop being down is no reason for systemd to restart us.
        classifier.answering = False
        await wait_until(lambda: not srv.health.snapshot().classifier_ok, what="ping failure seen")
        drain(sock)
        await asyncio.sleep(0.5)
        assert drain(sock) == []  # withheld while the inference side does not answer
        classifier.answering = True
        got: list[bytes] = []
        await wait_until(lambda: got.extend(drain(sock)) or got, what="WATCHDOG=1 again")
        assert set(got) == {b"WATCHDOG=1"}
    finally:
        task.cancel()
        sock.close()


def test_triaged_serve_sends_watchdog_pings(tmp_path: Path, capture_port_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    sock = notify_socket(path)
    sock.setblocking(True)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with TriagedProcess(capture_port_url):
        got = [sock.recv(4096) for _ in range(4)]
    sock.close()
    assert got[0] == b"READY=1"
    assert got[1:] == [b"WATCHDOG=1"] * 3


@pytest.fixture
def capture_port_url(tmp_path: Path) -> str:
    """A Maildir next hop for the subprocess (no asyncio server needed)."""
    return f"maildir:{tmp_path / 'Maildir'}"


async def test_checks_run_only_for_a_reader(capture: CaptureServer) -> None:
    """No metrics listener, no timing of its own: the embedded server pings
    nothing (and opens nothing). With a timing of its own (a worker whose
    supervisor reads its snapshots), the checks run and it becomes ready."""
    quiet_classifier, read_classifier = SwitchableClassifier(), SwitchableClassifier()
    quiet = Server(base_settings(capture.url), classifier=quiet_classifier)
    read = Server(base_settings(capture.url), classifier=read_classifier, health_timing=FAST)
    await quiet.start()
    await read.start()
    try:
        await wait_until(lambda: read.health.snapshot().ready, what="the read server ready")
        assert read_classifier.pings > 0
        assert quiet_classifier.pings == 0 and not quiet.health.snapshot().ready
        assert quiet.health.snapshot().alive  # the heartbeat runs either way
    finally:
        await quiet.stop(drain_timeout_s=1.0)
        await read.stop(drain_timeout_s=1.0)


async def test_readyz_says_draining_while_open_transactions_finish(capture: CaptureServer) -> None:
    """SIGTERM's drain: a balancer must stop sending new sessions at once
    (503 "draining") while the open transaction still finishes."""
    srv = Server(base_settings(capture.url, metrics={"listen": "127.0.0.1:0"}), health_timing=FAST)
    await srv.start()
    assert srv.metrics_port is not None
    port = srv.metrics_port
    await status_becomes(port, "/readyz", 200)
    c = await SmtpTestClient.connect(*srv.addresses[0])
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO x.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    stopping = asyncio.create_task(srv.stop(drain_timeout_s=20.0))
    body = await status_becomes(port, "/readyz", 503)
    assert "draining" in body["reasons"] and body["draining"] is True and body["alive"] is True
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.data(b"Subject: last one\r\n\r\nbody\r\n"))[0] == 250
    await stopping
    await c.close()
    assert len(capture.messages) == 1
