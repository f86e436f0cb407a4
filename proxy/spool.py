"""A disk spool for events Kafka could not take: append-only segment files.

Blocking file I/O: every method is meant to run on ONE worker thread (the
event shipper owns a single-thread executor), never on the event loop.
One writer and one reader, strictly FIFO: `read()` returns records from the
acknowledged cursor on, `ack()` moves the cursor and deletes segments that are
wholly acknowledged. The cursor is persisted, so a restart replays only what
Kafka has not acknowledged (a crash between send and ack can repeat a chunk:
at-least-once).

Segment file `<n:020d>.seg` is a run of frames:

    u32 length | u32 crc32(payload) | payload
    payload = u16 key length | u64 timestamp ms | key | value

A torn frame at the tail of the newest segment (crash mid-write) is cut off on
open; a bad frame inside an older segment ends that segment (what follows is
unreadable and counted in `corrupt_frames`).
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from proxy.fsync_policy import FsyncedFile, FsyncPolicy

_HEADER = struct.Struct(">II")
_META = struct.Struct(">HQ")
_MAX_FRAME = 64 * 1024 * 1024  # larger lengths are garbage, not records
_CURSOR = "cursor"


class SpoolLocked(OSError):
    """Another process owns this spool directory (give each worker its own)."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    key: bytes
    value: bytes
    timestamp_ms: int
    segment: int  # (segment, end): the position just after this record, for ack()
    end: int


@dataclass(slots=True)
class _Segment:
    number: int
    size: int  # bytes of valid frames
    records: int


def frame_size(key: bytes, value: bytes) -> int:
    """Bytes one record takes on disk (for callers that budget spool space)."""
    return _HEADER.size + _META.size + len(key) + len(value)


class Spool(FsyncedFile):
    def __init__(
        self,
        directory: str | Path,
        *,
        max_bytes: int,
        segment_bytes: int,
        fsync: FsyncPolicy = "interval",
        fsync_interval_s: float = 1.0,
    ) -> None:
        super().__init__(fsync, fsync_interval_s)  # _fd: the newest segment, open for append
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []  # oldest first; the last is written to
        self._lock_fd: int | None = None
        self._cursor = (0, 0)  # (segment number, offset) of the first unacked frame
        self._next_number = 1
        self.pending = 0  # unacknowledged records
        self.bytes = 0  # bytes of segment files on disk
        self.corrupt_frames = 0
        self.write_errors = 0

    # -- open / close ---------------------------------------------------------

    def open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        # One owner per directory: two processes appending to one segment
        # would interleave frames. The lock dies with the process.
        self._lock_fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolLocked(f"{self._dir}: spool in use by another process") from None
        numbers = sorted(
            int(p.name[:-4]) for p in self._dir.glob("*.seg") if p.name[:-4].isdigit()
        )
        cursor = self._load_cursor()
        for i, number in enumerate(numbers):
            path = self._path(number)
            if number < cursor[0]:
                path.unlink(missing_ok=True)  # acked before a crash lost the delete
                continue
            size, records, bad = _scan(path)
            if bad:
                self.corrupt_frames += 1
                if i == len(numbers) - 1:
                    os.truncate(path, size)  # torn tail of the newest segment
            self._segments.append(_Segment(number, size, records))
        if numbers:
            self._next_number = numbers[-1] + 1
        if self._segments:
            first = self._segments[0]
            offset = cursor[1] if cursor[0] == first.number else 0
            _, acked, _ = _scan(self._path(first.number), stop_at=offset)
            self._cursor = (first.number, offset)
            self.pending = sum(s.records for s in self._segments) - acked
            self.bytes = sum(s.size for s in self._segments)
        self._drop_if_drained()

    def close(self) -> None:
        self._close_segment()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _close_segment(self) -> None:
        if self._fd is not None:
            if self._dirty and self._fsync != "never":
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        self._dirty = False

    # -- writer ---------------------------------------------------------------

    def append(self, records: Sequence[tuple[bytes, bytes, int]]) -> int:
        """Append (key, value, timestamp_ms) records in order. Returns how many
        were stored: a prefix; the rest did not fit under max_bytes (or the disk
        failed, see write_errors) and are the caller's to count as dropped."""
        accepted = 0
        chunk: list[bytes] = []
        chunk_bytes = 0
        try:
            for key, value, ts in records:
                payload = _META.pack(len(key), ts) + key + value
                frame = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
                if self.bytes + chunk_bytes + len(frame) > self._max_bytes:
                    break
                if not self._segments:
                    self._new_segment()
                seg = self._segments[-1]
                if seg.size + chunk_bytes > 0 and seg.size + chunk_bytes + len(frame) > self._segment_bytes:
                    accepted += self._write(chunk, chunk_bytes)
                    chunk, chunk_bytes = [], 0
                    self._seal()
                    self._new_segment()
                chunk.append(frame)
                chunk_bytes += len(frame)
            accepted += self._write(chunk, chunk_bytes)
        except OSError:
            self.write_errors += 1
        self._sync_per_policy()
        return accepted

    # -- reader ---------------------------------------------------------------

    def read(self, max_records: int, max_bytes: int = 4 * 1024 * 1024) -> list[SpoolRecord]:
        """Up to max_records (and about max_bytes) from the cursor on, oldest
        first, without acking them. At least one record when any is pending."""
        out: list[SpoolRecord] = []
        taken = 0
        seg_no, offset = self._cursor
        for seg in list(self._segments):
            if seg.number < seg_no:
                continue
            pos = offset if seg.number == seg_no else 0
            if pos >= seg.size:
                continue
            with open(self._path(seg.number), "rb", buffering=256 * 1024) as f:
                f.seek(pos)
                while pos < seg.size and len(out) < max_records and (not out or taken < max_bytes):
                    rec = _read_frame(f, seg.number, pos)
                    if rec is None:  # damaged since open: the rest is lost
                        self.corrupt_frames += 1
                        self.bytes -= seg.size - pos
                        seg.size = pos
                        if seg is self._segments[-1]:
                            self._seal()  # appends must not land behind the damage
                            self._new_segment()
                        self._recount()
                        break
                    taken += rec.end - pos
                    pos = rec.end
                    out.append(rec)
            if len(out) >= max_records or taken >= max_bytes:
                break
        return out

    def ack(self, last: SpoolRecord, count: int) -> None:
        """Records up to and including `last` (`count` of them) reached Kafka."""
        self._cursor = (last.segment, last.end)
        self.pending -= count
        while self._segments and self._segments[0].number < last.segment:
            self._delete(self._segments.pop(0))
        if (
            len(self._segments) > 1
            and self._segments[0].number == last.segment
            and self._segments[0].size == last.end
        ):
            self._delete(self._segments.pop(0))
            self._cursor = (self._segments[0].number, 0)
        if not self._drop_if_drained():
            self._save_cursor()

    # -- internals ------------------------------------------------------------

    def _new_segment(self) -> None:
        number = self._next_number
        self._next_number += 1
        self._segments.append(_Segment(number, 0, 0))
        if len(self._segments) == 1:
            self._cursor = (number, 0)

    def _seal(self) -> None:
        if self._fd is not None:
            if self._fsync != "never":
                os.fsync(self._fd)  # a sealed segment is durable under both policies
            os.close(self._fd)
            self._fd = None
            self._dirty = False

    def _write(self, frames: list[bytes], nbytes: int) -> int:
        if not frames:
            return 0
        seg = self._segments[-1]
        if self._fd is None:
            self._fd = os.open(self._path(seg.number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if self._fsync == "always":
                _fsync_dir(self._dir)  # the new file's name must survive a crash too
        view = memoryview(b"".join(frames))
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            os.ftruncate(self._fd, seg.size)  # no half frame left behind
            raise
        self._dirty = True
        seg.size += nbytes
        seg.records += len(frames)
        self.bytes += nbytes
        self.pending += len(frames)
        return len(frames)

    def _drop_if_drained(self) -> bool:
        """Everything acked: delete all segments and the cursor, start afresh."""
        if self.pending > 0:
            return False
        self._close_segment()
        for seg in self._segments:
            self._path(seg.number).unlink(missing_ok=True)
        self._segments.clear()
        self.bytes = 0
        self.pending = 0
        self._cursor = (self._next_number, 0)
        (self._dir / _CURSOR).unlink(missing_ok=True)
        return True

    def _recount(self) -> None:
        seg_no, offset = self._cursor
        total = 0
        for seg in self._segments:
            if seg.number >= seg_no:
                start = offset if seg.number == seg_no else 0
                _, before, _ = _scan(self._path(seg.number), stop_at=start)
                seg.records = _scan(self._path(seg.number), stop_at=seg.size)[1]
                total += seg.records - before
        self.pending = total

    def _delete(self, seg: _Segment) -> None:
        self._path(seg.number).unlink(missing_ok=True)
        self.bytes -= seg.size

    def _path(self, number: int) -> Path:
        return self._dir / f"{number:020d}.seg"

    def _load_cursor(self) -> tuple[int, int]:
        try:
            seg, off = (self._dir / _CURSOR).read_text().split()
            return int(seg), int(off)
        except (OSError, ValueError):
            return (0, 0)

    def _save_cursor(self) -> None:
        tmp = self._dir / (_CURSOR + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{self._cursor[0]} {self._cursor[1]}\n")
            if self._fsync == "always":
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self._dir / _CURSOR)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_frame(f: BinaryIO, segment: int, pos: int) -> SpoolRecord | None:
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    length, crc = _HEADER.unpack(head)
    if length < _META.size or length > _MAX_FRAME:
        return None
    payload = f.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    klen, ts = _META.unpack_from(payload)
    key = payload[_META.size : _META.size + klen]
    end = pos + _HEADER.size + length
    return SpoolRecord(key, payload[_META.size + klen :], ts, segment, end)


def _scan(path: Path, stop_at: int | None = None) -> tuple[int, int, bool]:
    """(valid bytes, valid records, bad frame found) of one segment file,
    looking at frames that start before stop_at."""
    data = path.read_bytes()
    limit = len(data) if stop_at is None else min(stop_at, len(data))
    pos = records = 0
    while pos < limit:
        if pos + _HEADER.size > len(data):
            return pos, records, True
        length, crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if length < _META.size or length > _MAX_FRAME or end > len(data):
            return pos, records, True
        if zlib.crc32(data[pos + _HEADER.size : end]) != crc:
            return pos, records, True
        pos = end
        records += 1
    return pos, records, False
