"""The embedded event sink: JSON lines in a rotating file (no Kafka needed).

Used when events.bootstrap_servers is empty, e.g. `make run`. Same contract as
the Kafka shipper: `record()` only appends to a bounded deque; one task encodes
and hands batches to a single writer thread, so the event loop never touches
the disk. One event per line, the same JSON as on the Kafka topic.
`events.jsonl` rotates to `events.jsonl.1` ... `.N` (N = jsonl_keep) past
jsonl_max_bytes; the oldest is deleted.

Several worker processes (server.workers) append to the one file: each batch
is written under an flock on `.events.jsonl.lock` beside it, with the size
re-read from the file and the file reopened when another process rotated it,
so lines never interleave and a rotation happens once.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path

import msgspec
import structlog
from prometheus_client import CollectorRegistry

from proxy.events import QueuedSink
from proxy.fsync_policy import FsyncedFile, FsyncPolicy
from proxy.settings import EventsSettings

log = structlog.get_logger("triaged.events")

_CHUNK = 1024


class RotatingFile(FsyncedFile):
    """Append-only file rotated by size. Blocking: call from one thread."""

    def __init__(
        self, path: str | Path, *, max_bytes: int, keep: int, fsync: FsyncPolicy, fsync_interval_s: float
    ) -> None:
        super().__init__(fsync, fsync_interval_s)
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._keep = keep
        self._size = 0
        self._lock_fd: int | None = None
        self.rotations = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock_fd is None:
            lock = self.path.with_name(f".{self.path.name}.lock")
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
        self._open_file()

    def _open_file(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write_lines(self, lines: list[bytes]) -> None:
        """Append lines (without newlines); rotates between lines, so a file
        exceeds max_bytes only when one line alone does."""
        if self._fd is None or self._lock_fd is None:
            self.open()
        assert self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._follow_rotation()
            self._write_lines(lines)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._sync_per_policy()

    def _follow_rotation(self) -> None:
        """Under the lock: reopen when another process rotated the file; take
        the size from the file (others append too)."""
        assert self._fd is not None
        mine = os.fstat(self._fd)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            self._close_file()
            self._open_file()
        else:
            self._size = mine.st_size

    def _write_lines(self, lines: list[bytes]) -> None:
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

    def close(self) -> None:
        self._close_file()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_file(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        self._close_file()
        # .keep is overwritten by .keep-1: the oldest goes.
        for i in range(self._keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.rotations += 1
        self._open_file()


class JsonlSink(QueuedSink):
    def __init__(
        self,
        settings: EventsSettings,
        *,
        instance_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(
            settings, instance_id=instance_id, registry=registry, thread_name_prefix="triaged-jsonl"
        )
        self._file = RotatingFile(
            settings.jsonl_path,
            max_bytes=settings.jsonl_max_bytes,
            keep=settings.jsonl_keep,
            fsync=settings.fsync,
            fsync_interval_s=settings.fsync_interval_s,
        )
        self.written = 0
        self.write_errors = 0

    @property
    def rotations(self) -> int:
        return self._file.rotations

    async def start(self) -> None:
        await self._in_io(self._file.open)
        self._task = asyncio.create_task(self._run(), name="event-jsonl")

    async def close(self) -> None:
        task = self._begin_close()
        if task is None:
            return
        self._wake.set()
        await task
        await self._in_io(self._file.close)
        self._io.shutdown(wait=False)

    async def _run(self) -> None:
        linger_s = self._s.linger_ms / 1000
        while True:
            if not self._queue:
                if self._closed:
                    return
                await self._idle()
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
                await self._in_io(self._file.write_lines, lines)
            except OSError as exc:
                # Lines before the failure may be in the file: counted as dropped.
                self.write_errors += 1
                self._drop(len(lines), "write_error")
                log.error("event_file_error", error=exc.strerror)
                continue
            self.written += len(lines)
            self._m.written.inc(len(lines))

    async def _idle(self) -> None:
        timeout = await self._sync_when_due(self._file)
        self._wake.clear()
        if self._queue or self._closed:
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass
