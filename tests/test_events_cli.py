"""`triaged serve` as an operator runs it, shipping events from its config:
to a real broker, and into the spool when the broker is gone at shutdown."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import SmtpTestClient
from kafka_broker import KAFKA_MARKS, TANSU, TOPIC, KafkaBroker, free_port
from test_events_e2e import message, mid_hashes, topic_hashes
from triaged_proc import TRIAGED, wait_for_banner

from proxy.events import decode_event
from proxy.spool import Spool

pytestmark = [
    *KAFKA_MARKS,
    pytest.mark.skipif(not TRIAGED.exists(), reason="the triaged console script is not installed"),
]


def write_config(workdir: Path, port: int, bootstrap: str, *, workers: int = 0) -> Path:
    config = workdir / "triaged.toml"
    config.write_text(
        f"""\
[server]
workers = {workers}

[[server.listeners]]
address = "127.0.0.1:{port}"

[upstream]
url = "maildir:{workdir / "maildir"}"

[classifier]
kind = "rules"

[events]
bootstrap_servers = ["{bootstrap}"]
topic = "{TOPIC}"
request_timeout_s = 2.0
close_timeout_s = 3.0
spool_dir = "{workdir / "spool"}"

[logging]
format = "json"
"""
    )
    return config


class Serve:
    def __init__(self, workdir: Path, bootstrap: str) -> None:
        self.port = free_port()
        self.config = write_config(workdir, self.port, bootstrap)
        self.log = workdir / "triaged.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(TRIAGED), "serve", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_banner(self.port, 30, self.proc)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


async def send(port: int, first: int, count: int) -> list[str]:
    c = await SmtpTestClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.example"))[0] == 250
    mids = []
    for n in range(first, first + count):
        mid, body = message(n)
        code, text = await c.send_message("someone@sender.example", ["you@rcpt.example"], body)
        assert code == 250, text
        mids.append(mid)
    await c.cmd("QUIT")
    await c.close()
    return mids


async def test_serve_ships_every_event_and_flushes_on_sigterm(tmp_path: Path) -> None:
    assert TANSU is not None
    broker = KafkaBroker(TANSU, tmp_path / "tansu.log", TOPIC)
    broker.start()
    serve = Serve(tmp_path, broker.bootstrap)
    try:
        await asyncio.to_thread(serve.start)
        mids = await send(serve.port, 0, 200)
        assert await asyncio.to_thread(serve.stop) == 0  # graceful: flushes what is queued
        assert topic_hashes(await broker.consume(200)) == mid_hashes(mids)
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.proc.kill()
        broker.kill()


async def test_broker_gone_at_shutdown_leaves_events_in_the_spool(tmp_path: Path) -> None:
    serve = Serve(tmp_path, f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        await asyncio.to_thread(serve.start)
        mids = await send(serve.port, 0, 150)
        assert await asyncio.to_thread(serve.stop) == 0
    finally:
        if serve.proc and serve.proc.poll() is None:
            serve.proc.kill()
    # One spool directory per worker slot (slot 0: spool_dir itself).
    records, pending = [], 0
    for directory in [tmp_path / "spool", *sorted((tmp_path / "spool").glob("worker-*"))]:
        spool = Spool(directory, max_bytes=1 << 30, segment_bytes=1 << 24)
        spool.open()
        records += spool.read(1000)
        pending += spool.pending
        spool.close()
    assert pending == len(records) == 150
    assert sorted(decode_event(r.value).message_id_hash for r in records) == mid_hashes(mids)
    assert len(list((tmp_path / "maildir" / "new").iterdir())) == 150  # and every message delivered


def test_unusable_spool_is_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    # One process: with workers, each logs its own start_failed line.
    config = write_config(tmp_path, free_port(), "127.0.0.1:9", workers=1)
    (tmp_path / "spool").write_text("a file where the spool directory should be")
    done = subprocess.run([str(TRIAGED), "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if '"start_failed"' in line]
    assert len(errors) == 1 and '"component":"events"' in errors[0]
