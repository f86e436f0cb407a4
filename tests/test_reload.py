"""SIGHUP re-reads the config file: live changes under load, broken files,
restart-only keys (proxy/reload.py).

In-process servers for the load tests (the reload entry point is the same
function the signal handler calls), and one real `triaged serve` child that
gets a real SIGHUP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from conftest import CaptureServer, SmtpTestClient, base_settings
from triaged_proc import REPO, TriagedProcess, free_port
from waiting import wait_until, wait_until_blocking

from proxy.events import make_event_sink
from proxy.reload import reload_from_file
from proxy.server import Server
from proxy.settings import Settings, dump_toml

MODEL = REPO / "models" / "default.onnx"


def message(n: int) -> bytes:
    return (f"From: a@example.org\r\nTo: b@example.net\r\nSubject: load {n}\r\n"
            f"Message-ID: <n{n}@example.org>\r\n\r\nmessage number {n}\r\n").encode()


def number_of(data: bytes) -> int:
    return int(data.rsplit(b"message number ", 1)[1].split(b"\r\n", 1)[0])


def replace(settings: Settings, section: str, **changes: Any) -> Settings:
    return msgspec.structs.replace(
        settings, **{section: msgspec.structs.replace(getattr(settings, section), **changes)})


class Load:
    """`clients` sessions sending numbered messages until stopped; every
    final reply kept by number."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.port = port
        self.clients = clients
        self.replies: dict[int, int] = {}
        self.failures: list[tuple[int, int, str]] = []
        self._next = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def _client(self) -> None:
        c = await SmtpTestClient.connect("127.0.0.1", self.port)
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO load.test"))[0] == 250
        while not self._stop.is_set():
            n = self._next
            self._next += 1
            code, text = await c.send_message("a@example.org", ["b@example.net"], message(n))
            self.replies[n] = code
            if code != 250:
                self.failures.append((n, code, text))
        await c.cmd("QUIT")
        await c.close()

    async def until(self, count: int) -> int:
        """Wait until `count` more transactions finished; the highest number sent so far."""
        target = len(self.replies) + count
        await wait_until(lambda: len(self.replies) >= target, what=f"{count} more transactions")
        return self._next

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


Start = Callable[..., Awaitable[tuple[Server, Path]]]


@pytest.fixture
async def start(capture: CaptureServer, tmp_path: Path) -> AsyncIterator[Start]:
    """A server started from a config file it can re-read, and the file."""
    started: list[Server] = []

    async def run(settings: Settings | None = None, *, events: bool = False) -> tuple[Server, Path]:
        settings = settings or base_settings(capture.url)
        path = tmp_path / "triaged.toml"
        path.write_text(dump_toml(settings))
        sinks = []
        sink = None
        if events:
            sink = make_event_sink(settings.events)
            await sink.start()
            sinks.append(sink)
        srv = Server(settings, sinks=sinks)
        srv.events = sink
        await srv.start()
        started.append(srv)
        return srv, path

    yield run
    for srv in started:
        await srv.stop(drain_timeout_s=1.0)
        if srv.events is not None:
            await srv.events.close()


async def test_policy_and_stamping_change_live_under_load(start: Start, capture: CaptureServer) -> None:
    srv, path = await start()
    load = Load(srv.addresses[0][1])
    load.start()
    await load.until(40)
    new = replace(srv.settings, "stamping", category_header="X-Sorted-Into")
    new = replace(new, "policy", category_actions={"primary": "tag"}, subject_tag="[{category}]")
    path.write_text(dump_toml(new))
    with structlog.testing.capture_logs() as logs:
        result = await reload_from_file(srv, path)
    assert result.ok and "stamping.category_header" in result.applied, result
    after = await load.until(40)  # every message numbered from here on started after the reload
    await load.stop()

    assert load.failures == []
    assert [e for e in logs if e["event"] == "config_reloaded"]
    assert len(capture.messages) == len(load.replies)
    for got in capture.messages:
        head = got.data.split(b"\r\n\r\n", 1)[0]
        old, new_ = b"X-Triage-Category: " in head, b"X-Sorted-Into: " in head
        assert old != new_, head  # one generation per message, never both or neither
        if number_of(got.data) >= after:
            assert new_ and b"Subject: [primary] load" in head, head


async def test_upstream_change_live_under_load(start: Start, capture: CaptureServer) -> None:
    second = CaptureServer()
    await second.start()
    try:
        srv, path = await start()
        load = Load(srv.addresses[0][1])
        load.start()
        await load.until(40)
        old_pool = srv.upstream.current
        path.write_text(dump_toml(replace(srv.settings, "upstream", url=second.url)))
        result = await reload_from_file(srv, path)
        assert result.ok and result.applied == ["upstream.url"], result
        after = await load.until(40)
        await load.stop()

        assert load.failures == []
        numbers = sorted(number_of(m.data) for m in capture.messages + second.messages)
        assert numbers == sorted(load.replies)  # each exactly once, across both next hops
        assert [n for n in (number_of(m.data) for m in capture.messages) if n >= after] == []
        assert len(second.messages) >= 40
        # The old pool was closed once its last lease came back.
        await wait_until(lambda: old_pool not in srv.upstream._retired, what="old pool retired")
        assert srv.upstream.leases_of(old_pool) == 0
        assert getattr(old_pool, "_closed", False) is True
    finally:
        await second.stop()


async def test_broken_config_keeps_the_old_one(start: Start, capture: CaptureServer) -> None:
    srv, path = await start()
    before = srv.settings
    path.write_text(dump_toml(before).replace("max_connections = 1000", 'max_connections = "many"'))
    with structlog.testing.capture_logs() as logs:
        result = await reload_from_file(srv, path)
    assert not result.ok
    failed = [e for e in logs if e["event"] == "config_reload_failed"]
    assert len(failed) == 1 and "server.max_connections" in failed[0]["error"], logs
    assert srv.settings is before
    path.write_text("this is [not toml")
    with structlog.testing.capture_logs() as logs:
        assert not (await reload_from_file(srv, path)).ok
    assert [e["event"] for e in logs] == ["config_reload_failed"]
    assert "not valid TOML" in logs[0]["error"]
    # Still serving, as configured before.
    c = await SmtpTestClient.connect(*srv.addresses[0])
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO x.test"))[0] == 250
    assert (await c.send_message("a@example.org", ["b@example.net"], message(1)))[0] == 250
    await c.close()


async def test_a_classifier_that_fails_to_start_keeps_everything(start: Start, tmp_path: Path) -> None:
    srv, path = await start()
    before = srv.settings
    bad = replace(before, "classifier", kind="onnx", model_path=str(tmp_path / "missing.onnx"), runner="thread")
    bad = replace(bad, "stamping", category_header="X-Would-Change")
    path.write_text(dump_toml(bad))
    with structlog.testing.capture_logs() as logs:
        result = await reload_from_file(srv, path)
    assert not result.ok
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["config_reload_failed"]
    assert srv.settings is before and srv.pipeline.settings is before


async def test_listener_change_needs_a_restart(start: Start, capture: CaptureServer) -> None:
    srv, path = await start()
    old_listeners = srv.settings.server.listeners
    other = free_port()
    new = replace(srv.settings, "server",
                  listeners=[msgspec.structs.replace(old_listeners[0], address=f"127.0.0.1:{other}")],
                  max_recipients=1)
    new = replace(new, "metrics", listen="127.0.0.1:0")
    path.write_text(dump_toml(new))
    with structlog.testing.capture_logs() as logs:
        result = await reload_from_file(srv, path)
    assert result.ok
    assert result.needs_restart == ["metrics.listen", "server.listeners"]
    assert result.applied == ["server.max_recipients"]
    [line] = [e for e in logs if e["event"] == "config_reload_needs_restart"]
    assert line["keys"] == ["metrics.listen", "server.listeners"]
    # Not applied: the old listener serves, nothing on the new port, no metrics listener.
    assert srv.settings.server.listeners == old_listeners and srv.settings.metrics.listen == ""
    assert srv.status is None
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", other)
    # The live part is: a second recipient is refused now.
    c = await SmtpTestClient.connect(*srv.addresses[0])
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO x.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.cmd("RCPT TO:<c@example.net>"))[0] == 452
    await c.close()


async def test_classifier_and_events_change_live_under_load(
    start: Start, capture: CaptureServer, tmp_path: Path
) -> None:
    first = base_settings(capture.url)
    first = replace(first, "events", jsonl_path=str(tmp_path / "one.jsonl"), spool_dir=str(tmp_path / "spool"),
                    linger_ms=10.0)
    srv, path = await start(first, events=True)
    old_classifier = srv.classifier
    load = Load(srv.addresses[0][1])
    load.start()
    await load.until(30)
    new = replace(srv.settings, "classifier", kind="onnx", model_path=str(MODEL), runner="thread",
                  provider="cpu")
    new = replace(new, "events", jsonl_path=str(tmp_path / "two.jsonl"))
    path.write_text(dump_toml(new))
    result = await reload_from_file(srv, path)
    assert result.ok and result.model_reloaded, result
    assert "classifier.kind" in result.applied and "events.jsonl_path" in result.applied
    after = await load.until(30)
    await load.stop()
    assert load.failures == []
    assert srv.classifier is not old_classifier
    # Messages that started after the reload were classified by the model.
    model = srv.classifier.model_name
    assert model and model != "rules/1"
    stamped = {number_of(m.data): m.data.split(b"\r\n\r\n", 1)[0] for m in capture.messages}
    assert all(f"X-Triage-Model: {model}".encode() in stamped[n] for n in stamped if n >= after)
    # Every transaction's event is in exactly one of the two files.
    await srv.events.close()  # type: ignore[union-attr]
    srv.events = None
    ids: list[str] = []
    for name in ("one.jsonl", "two.jsonl"):
        f = tmp_path / name
        ids += [json.loads(line)["queue_id"] for line in f.read_text().splitlines()] if f.exists() else []
    assert len(ids) == len(set(ids)) == len(load.replies)
    assert (tmp_path / "two.jsonl").exists()


def _events(log: str) -> list[dict[str, Any]]:
    events = []
    for line in log.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def all_started(log: str) -> bool:
    """The single process's or the supervisor's "started" (every worker listens)."""
    return any(e.get("event") == "started" and "worker" not in e for e in _events(log))


def reloaded_everywhere(log: str) -> bool:
    events = _events(log)
    # The supervisor's "started" line (no "worker" field) names every worker.
    supervisor = [e for e in events if e.get("event") == "started" and "workers" in e and "worker" not in e]
    workers = len(supervisor[0]["workers"]) if supervisor else 1
    return len({e.get("worker") for e in events if e.get("event") == "config_reloaded"}) >= workers


def test_sighup_rereads_the_config_of_triaged_serve(tmp_path: Path) -> None:
    """The real signal path: `triaged serve --config FILE`, edit FILE, SIGHUP."""
    maildir = tmp_path / "Maildir"
    with TriagedProcess(f"maildir:{maildir}", workdir=tmp_path) as t:
        def send(n: int) -> bytes:
            with smtplib.SMTP("127.0.0.1", t.port, timeout=20) as s:
                s.sendmail("a@example.org", ["b@example.net"], message(n))
            before = set((maildir / "new").iterdir())
            return b"".join(p.read_bytes() for p in before)

        assert b"X-Triage-Category: " in send(1)
        # workers = 0 may be several workers: the first banner may come while others
        # start (one that starts during a SIGHUP reloads once it listens, from
        # the file as it is then: here already the broken one).
        wait_until_blocking(lambda: all_started(t.log_tail(1 << 20)), what="every worker listening")
        text = t.config_path.read_text()
        t.config_path.write_text(text + '\n[stamping]\ncategory_header = "X-Reloaded-Category"\n')
        t.signal(signal.SIGHUP)
        # By every worker (workers = 0 may be several, each connection is
        # hashed to one of them), not only the first to log it.
        wait_until_blocking(lambda: reloaded_everywhere(t.log_tail(1 << 20)), what="config_reloaded logged")
        for old in (maildir / "new").iterdir():
            old.unlink()
        assert b"X-Reloaded-Category: " in send(2)
        # A broken file now: logged, and the reloaded config keeps serving.
        t.config_path.write_text(text.replace("[upstream]", "[upstream]\nnot_a_key = 1"))
        t.signal(signal.SIGHUP)
        wait_until_blocking(lambda: "config_reload_failed" in t.log_tail(20000), what="failure logged")
        assert "unknown field `not_a_key`" in t.log_tail(20000)
        for old in (maildir / "new").iterdir():
            old.unlink()
        assert b"X-Reloaded-Category: " in send(3)
