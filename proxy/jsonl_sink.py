"""The embedded event sink: JSON lines in a rotating file (no Kafka needed).

Used when events.bootstrap_servers is empty, e.g. `make run`. Same contract as
the Kafka shipper: `record()` only appends to a bounded deque; one task encodes
and hands batches to a single writer thread, so the event loop never touches
the disk. One event per line, the same JSON as on the Kafka topic.
`events.jsonl` rotates to `events.jsonl.1` ... `.N` (N = jsonl_keep) past
jsonl_max_bytes; the oldest is deleted.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import structlog
from prometheus_client import CollectorRegistry

from proxy.events import DropCounter, EventBuilder, EventMetrics, default_instance_id
from proxy.settings import EventsSettings
from proxy.transaction import TransactionRecord

log = structlog.get_logger("triaged.events")

_CHUNK = 1024


class RotatingFile:
    """Append-only file rotated by size. Blocking: call from one thread."""

    def __init__(self, path: str | Path, *, max_bytes: int, keep: int, fsync: str, fsync_interval_s: float) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._keep = keep
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._fd: int | None = None
        self._size = 0
        self._last_sync = time.monotonic()
        self._dirty = False
        self.rotations = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write_lines(self, lines: list[bytes]) -> None:
        """Append lines (without newlines); rotates between lines, so a file
        exceeds max_bytes only when one line alone does."""
        if self._fd is None:
            self.open()
        group: list[bytes] = []
        group_bytes = 0
        for line in lines:
            if self._size + group_bytes > 0 and self._size + group_bytes + len(line) + 1 > self._max_bytes:
                self._write(group, group_bytes)
                group, group_bytes = [], 0
                self._rotate()
            group.append(line)
            group_bytes += len(line) + 1
        self._write(group, group_bytes)
        now = time.monotonic()
        if self._fsync == "always" or (
            self._fsync == "interval" and now - self._last_sync >= self._fsync_interval_s
        ):
            self.sync()

    def _write(self, lines: list[bytes], nbytes: int) -> None:
        if not lines:
            return
        assert self._fd is not None
        lines.append(b"")
        view = memoryview(b"\n".join(lines))
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += nbytes
        self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def last_sync(self) -> float:
        return self._last_sync

    def sync(self) -> None:
        if self._fd is not None and self._dirty and self._fsync != "never":
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        self.close()
        # .keep is overwritten by .keep-1: the oldest goes.
        for i in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.rotations += 1
        self.open()


class JsonlSink:
    def __init__(
        self,
        settings: EventsSettings,
        *,
        instance_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._s = settings
        self._m = EventMetrics(registry)
        self.registry = self._m.registry
        self._builder = EventBuilder(instance_id or default_instance_id(), settings.pseudonymize_secret)
        self._queue: deque[TransactionRecord] = deque()
        self._wake = asyncio.Event()
        self._file = RotatingFile(
            settings.jsonl_path,
            max_bytes=settings.jsonl_max_bytes,
            keep=settings.jsonl_keep,
            fsync=settings.fsync,
            fsync_interval_s=settings.fsync_interval_s,
        )
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triaged-jsonl")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._drop = DropCounter("events", self._m)
        self.written = 0
        self.write_errors = 0
        self._first_at = 0.0

    @property
    def dropped(self) -> int:
        return self._drop.total

    @property
    def rotations(self) -> int:
        return self._file.rotations

    def record(self, record: TransactionRecord) -> None:
        """O(1), never awaits, never raises: called on the mail path."""
        if self._closed or len(self._queue) >= self._s.queue_size:
            self._drop(1, "closed" if self._closed else "queue_full")
            return
        if not self._queue:
            self._first_at = time.monotonic()  # the linger window starts
        self._queue.append(record)
        self._wake.set()

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self._file.open)
        self._task = asyncio.create_task(self._run(), name="event-jsonl")

    async def close(self) -> None:
        if self._closed:
            return  # idempotent: the server may close twice on a failed start
        self._closed = True
        if self._task is None:
            self._drop(len(self._queue), "closed")
            self._queue.clear()
            return
        self._wake.set()
        await self._task
        await asyncio.get_running_loop().run_in_executor(self._io, self._file.close)
        self._io.shutdown(wait=False)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        linger_s = self._s.linger_ms / 1000
        while True:
            if not self._queue:
                if self._closed:
                    return
                await self._idle(loop)
                continue
            wait = self._first_at + linger_s - time.monotonic()
            if len(self._queue) < _CHUNK and wait > 0 and not self._closed:
                await asyncio.sleep(wait)  # collect a batch: one thread hop per batch, not per event
            lines: list[bytes] = []
            while self._queue and len(lines) < _CHUNK:
                rec = self._queue.popleft()
                try:
                    lines.append(self._builder.encode(rec))
                except (msgspec.EncodeError, ValueError, UnicodeError):
                    self._drop(1, "unencodable")
            if not lines:
                continue
            try:
                await loop.run_in_executor(self._io, self._file.write_lines, lines)
            except OSError as exc:
                # Lines before the failure may be in the file: counted as dropped.
                self.write_errors += 1
                self._drop(len(lines), "write_error")
                log.error("event_file_error", error=exc.strerror)
                continue
            self.written += len(lines)
            self._m.written.inc(len(lines))

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        timeout = None
        if self._file.dirty:  # fsync "interval": also when no further write comes
            due = self._file.last_sync + self._s.fsync_interval_s - time.monotonic()
            if due <= 0:
                await loop.run_in_executor(self._io, self._file.sync)
            else:
                timeout = due
        self._wake.clear()
        if self._queue or self._closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass
