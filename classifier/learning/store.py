"""The feedback store: what users told us about messages, kept for `triaged learn`.

One directory holds an append-only log (`feedback.log`) and a lock file.
Each record is framed so that a crash mid-write or a flipped bit costs at
most that record, never the store:

    MAGIC(4) | meta_len u32 | raw_len u32 | meta_crc u32 | raw_crc u32 | meta | raw

`meta` is a msgpack `_Meta` (label, user, kind, ...), `raw` the message as
received. The two checksums let a writer index the log (meta only, seeking
past the messages) without reading every message. A record that fails its
checks is skipped and the scan resynchronises at the next MAGIC; garbage at
the end (a torn append) is cut off by the next writer, with one log line.

De-duplication: a message is the same as a stored one when its Message-ID
or its body hash matches. A new label for it supersedes the old record (the
log keeps both until the next compaction; readers see the later one); the
same label again is not written at all.

Bounds: readers see at most `max_items` live records, the newest, none older
than `retention_days`. A writer rewrites the log (temp file, fsync, rename,
fsync of the directory) once it holds 10% more records than that, or once
the oldest record is past retention by a grace period, so the file stays
bounded and expired messages leave the disk.

Writers take an exclusive fcntl lock on `lock` for the whole add (index,
append, fsync, maybe compact); readers take a shared one. Several `triaged
feedback` processes (one per IMAPSieve move) and a running `triaged learn`
can share a store.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Final, Literal

import msgspec
import structlog

from classifier import headers

log = structlog.get_logger("triaged.feedback")

MAGIC: Final = b"TFB1"
_HEAD: Final = struct.Struct("<4sIIII")
MAX_META_BYTES: Final = 64 * 1024
MAX_RAW_BYTES: Final = 256 * 1024 * 1024
LOG_NAME: Final = "feedback.log"
LOCK_NAME: Final = "lock"

CATEGORY_HEADER: Final = b"x-triage-category"
SPAM_HEADER: Final = b"x-triage-spam"

Kind = Literal["correction", "confirmation"]
# What `raw` holds: the message ("message"), or only its feature ids
# ("features": a feedback event consumed from Kafka, classifier.learning.
# feature_items; msgpack of the ids and the feature parameters' digest).
Form = Literal["message", "features"]


class FeedbackItem(msgspec.Struct, frozen=True):
    raw: bytes  # the message, our X-Triage-* headers kept as received
    label: str  # a model category, "spam" or "ham"
    user: str
    kind: Kind  # "correction": the label contradicts what triaged stamped
    decided: str | None  # the stamped category, "spam" if stamped spam, None if unstamped
    time: float
    message_id: str
    body_hash: str
    form: Form = "message"


class _Meta(msgspec.Struct, frozen=True, array_like=True):
    label: str
    user: str
    kind: Kind
    decided: str | None
    time: float
    message_id: str
    body_hash: str
    # Last, with a default: records written before it decode as messages. A bool,
    # one byte a record: `form` of the item is "features" when it is true.
    features: bool = False


def _item(raw: bytes, m: _Meta) -> FeedbackItem:
    return FeedbackItem(raw, m.label, m.user, m.kind, m.decided, m.time, m.message_id,
                        m.body_hash, "features" if m.features else "message")  # fmt: skip


_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(_Meta)


class StoreError(Exception):
    """The store cannot be read or written (I/O); the caller should retry later."""


def body_hash(raw: bytes) -> str:
    """sha256 of the body with line endings unified and trailing whitespace cut:
    the same message through an MTA pipe (LF) and IMAP (CRLF) hashes alike."""
    _, start = headers.split(raw)
    body = raw[start:].replace(b"\r\n", b"\n").rstrip()
    return hashlib.sha256(body).hexdigest() if body else ""


def message_id(raw: bytes) -> str:
    value = headers.field(headers.head(raw), b"message-id")
    return value.decode("utf-8", "replace").strip() if value else ""


def decided(raw: bytes) -> str | None:
    """What triaged stamped: "spam" if X-Triage-Spam says yes, else the category."""
    block = headers.head(raw)
    found = headers.fields(block, (CATEGORY_HEADER, SPAM_HEADER))
    if found.get(SPAM_HEADER, b"").strip().lower() == b"yes":
        return "spam"
    category = found.get(CATEGORY_HEADER)
    if category is None:
        return None
    return category.decode("utf-8", "replace").strip() or None


def kind_of(label: str, stamped: str | None) -> Kind:
    """A correction is a label that contradicts the stamp. "ham" (out of Junk)
    contradicts only "spam"; an unstamped message has nothing to correct."""
    if stamped is None:
        return "confirmation"
    if label == "ham":
        return "correction" if stamped == "spam" else "confirmation"
    return "confirmation" if label == stamped else "correction"


class _Rec(msgspec.Struct):
    offset: int  # where the record's frame starts
    end: int
    meta: _Meta


class _Index:
    """Live records of the log (later labels supersede earlier ones)."""

    def __init__(self) -> None:
        self.live: dict[int, _Rec] = {}  # by frame offset, in log order
        self.keys: dict[str, int] = {}  # "m:<Message-ID>" / "b:<hash>" -> offset
        self.rec_keys: dict[int, set[str]] = {}  # offset -> the keys pointing at it
        self.records = 0  # frames in the file, superseded ones included
        self.end = 0  # end of the last valid frame

    @staticmethod
    def keys_of(meta: _Meta) -> list[str]:
        out = []
        if meta.message_id:
            out.append("m:" + meta.message_id)
        if meta.body_hash:
            out.append("b:" + meta.body_hash)
        return out

    def find(self, meta: _Meta, extra: set[str] | None = None) -> _Rec | None:
        for k in [*self.keys_of(meta), *(extra or ())]:
            off = self.keys.get(k)
            if off is not None:
                return self.live[off]
        return None

    def add(self, rec: _Rec) -> None:
        # The new record stands for the message under every key the records
        # it supersedes had: a copy without a Message-ID that matched by body
        # hash must still be found by that Message-ID later.
        keys = set(self.keys_of(rec.meta))
        while (old := self.find(rec.meta, extra=keys)) is not None:
            del self.live[old.offset]
            for k in self.rec_keys.pop(old.offset):
                keys.add(k)
                if self.keys.get(k) == old.offset:
                    del self.keys[k]
        self.live[rec.offset] = rec
        self.rec_keys[rec.offset] = keys
        for k in keys:
            self.keys[k] = rec.offset
        self.records += 1
        self.end = rec.end


def _scan(
    f: BinaryIO, size: int, *, path: Path, start: int = 0
) -> Iterator[tuple[int, int, _Meta, int, int]]:
    """(offset, end, meta, raw_offset, raw_crc) of each valid frame; bad frames are
    skipped (one log line each run of garbage) by resynchronising at the next MAGIC."""
    pos = start
    bad_at: int | None = None
    while pos + _HEAD.size <= size:
        f.seek(pos)
        head = f.read(_HEAD.size)
        ok = False
        if len(head) == _HEAD.size:
            magic, mlen, rlen, mcrc, rcrc = _HEAD.unpack(head)
            end = pos + _HEAD.size + mlen + rlen
            if magic == MAGIC and mlen <= MAX_META_BYTES and rlen <= MAX_RAW_BYTES and end <= size:
                mbytes = f.read(mlen)
                if zlib.crc32(mbytes) == mcrc:
                    try:
                        meta = _meta_decoder.decode(mbytes)
                        ok = True
                    except msgspec.DecodeError:
                        pass
        if ok:
            if bad_at is not None:
                log.warning(
                    "feedback_store_skipped_corrupt",
                    path=str(path),
                    offset=bad_at,
                    bytes=pos - bad_at,
                )
                bad_at = None
            yield pos, end, meta, pos + _HEAD.size + mlen, rcrc
            pos = end
            continue
        if bad_at is None:
            bad_at = pos
        nxt = _find_magic(f, pos + 1, size)
        if nxt < 0:
            break
        pos = nxt
    if bad_at is None and pos < size:
        bad_at = pos
    if bad_at is not None:
        log.warning(
            "feedback_store_corrupt_tail", path=str(path), offset=bad_at, bytes=size - bad_at
        )


def _find_magic(f: BinaryIO, start: int, size: int) -> int:
    """Offset of the next MAGIC at or after `start`, -1 if none; 1 MiB reads."""
    pos = start
    while pos < size:
        f.seek(pos)
        chunk = f.read(min(1 << 20, size - pos))
        i = chunk.find(MAGIC)
        if i >= 0:
            return pos + i
        if len(chunk) < len(MAGIC):
            return -1
        pos += len(chunk) - len(MAGIC) + 1  # a MAGIC across the edge is found next time
    return -1


def _frame(meta: _Meta, raw: bytes) -> bytes:
    m = _meta_encoder.encode(meta)
    return _HEAD.pack(MAGIC, len(m), len(raw), zlib.crc32(m), zlib.crc32(raw)) + m + raw


class FeedbackStore:
    def __init__(
        self, path: Path, *, max_items: int = 50_000, retention_days: float = 365.0
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        if retention_days <= 0:
            raise ValueError("retention_days must be positive")
        self.path = Path(path)
        self.max_items = max_items
        self.retention_s = retention_days * 86_400.0
        self._log = self.path / LOG_NAME
        self._lock = self.path / LOCK_NAME
        # A writer's index of the log, kept between adds: (inode, header of
        # the last indexed frame, index). A harvest of N messages must not
        # rescan the whole log N times.
        self._cache: tuple[int, bytes, _Index] | None = None

    # -- locking --------------------------------------------------------------

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o660)
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _index(self, f: BinaryIO) -> _Index:
        size = os.fstat(f.fileno()).st_size
        idx = _Index()
        for off, end, meta, _, _ in _scan(f, size, path=self._log):
            idx.add(_Rec(off, end, meta))
        return idx

    def _writer_index(self, f: BinaryIO) -> _Index:
        """The index, scanning only what was appended since the last add when
        the log is still the same file (not compacted by anyone since)."""
        st = os.fstat(f.fileno())
        if self._cache is not None:
            ino, last_head, idx = self._cache
            last = max(idx.live, default=None)  # the newest live frame
            ok = ino == st.st_ino and st.st_size >= idx.end
            if ok and last is not None:
                f.seek(last)
                ok = f.read(_HEAD.size) == last_head
            if ok:
                for off, end, meta, _, _ in _scan(f, st.st_size, path=self._log, start=idx.end):
                    idx.add(_Rec(off, end, meta))
                return idx
        return self._index(f)

    def _remember(self, f: BinaryIO, idx: _Index) -> None:
        last = max(idx.live, default=None)
        head = b""
        if last is not None:
            f.seek(last)
            head = f.read(_HEAD.size)
        self._cache = (os.fstat(f.fileno()).st_ino, head, idx)

    def _visible(self, idx: _Index, now: float) -> list[_Rec]:
        cutoff = now - self.retention_s
        recs = [r for r in idx.live.values() if r.meta.time >= cutoff]
        return recs[-self.max_items :]

    # -- API ------------------------------------------------------------------

    def add(self, raw: bytes, label: str, user: str) -> FeedbackItem | None:
        """Record `label` for `raw`; None when the store already has that label
        for the same message. StoreError when the disk fails us."""
        stamped = decided(raw)
        meta = _Meta(
            label=label,
            user=user,
            kind=kind_of(label, stamped),
            decided=stamped,
            time=time.time(),
            message_id=message_id(raw),
            body_hash=body_hash(raw),
        )
        return self._add(meta, raw)

    def add_features(
        self,
        payload: bytes,
        *,
        label: str,
        user: str,
        kind: Kind,
        decided: str | None,
        when: float,
        message_id: str,
        body_hash: str,
    ) -> FeedbackItem | None:
        """Record feedback known only by its features (a consumed feedback event):
        `payload` from classifier.learning.feature_items.encode. Same dedup rules."""
        meta = _Meta(label, user, kind, decided, when, message_id, body_hash, True)
        return self._add(meta, payload)

    def _add(self, meta: _Meta, raw: bytes) -> FeedbackItem | None:
        label = meta.label
        try:
            with self._locked(fcntl.LOCK_EX):
                with open(self._log, "a+b") as f:
                    self._cache, idx = None, self._writer_index(f)
                    old = idx.find(meta)
                    if old is not None and old.meta.label == label:
                        self._remember(f, idx)
                        return None
                    size = os.fstat(f.fileno()).st_size
                    if idx.end < size:  # a torn append: cut it, or it hides what follows
                        f.truncate(idx.end)
                    frame = _frame(meta, raw)
                    f.write(frame)  # "a" mode: at the end
                    f.flush()
                    os.fsync(f.fileno())
                    idx.add(_Rec(idx.end, idx.end + len(frame), meta))
                    if self._due(idx, meta.time):
                        self._compact(f, idx, meta.time)  # a new file: next add rescans
                    else:
                        self._remember(f, idx)
        except OSError as exc:
            raise StoreError(f"{self._log}: {exc.strerror or exc}") from None
        return _item(raw, meta)

    def items(self) -> list[FeedbackItem]:
        """Live items, oldest first: at most max_items, none past retention."""
        if not self._log.exists():
            return []
        out: list[FeedbackItem] = []
        try:
            with self._locked(fcntl.LOCK_SH), open(self._log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                idx = _Index()
                crcs: dict[int, tuple[int, int]] = {}
                for off, end, meta, roff, rcrc in _scan(f, size, path=self._log):
                    idx.add(_Rec(off, end, meta))
                    crcs[off] = (roff, rcrc)
                for rec in self._visible(idx, time.time()):
                    roff, rcrc = crcs[rec.offset]
                    f.seek(roff)
                    raw = f.read(rec.end - roff)
                    if zlib.crc32(raw) != rcrc:
                        log.warning(
                            "feedback_store_bad_message", path=str(self._log), offset=rec.offset
                        )
                        continue
                    out.append(_item(raw, rec.meta))
        except OSError as exc:
            raise StoreError(f"{self._log}: {exc.strerror or exc}") from None
        return out

    def __len__(self) -> int:
        if not self._log.exists():
            return 0
        try:
            with self._locked(fcntl.LOCK_SH), open(self._log, "rb") as f:
                return len(self._visible(self._index(f), time.time()))
        except OSError as exc:
            raise StoreError(f"{self._log}: {exc.strerror or exc}") from None

    def compact(self) -> None:
        """Rewrite the log now with only the visible records."""
        try:
            with self._locked(fcntl.LOCK_EX), open(self._log, "a+b") as f:
                self._compact(f, self._index(f), time.time())
        except OSError as exc:
            raise StoreError(f"{self._log}: {exc.strerror or exc}") from None

    # -- compaction -----------------------------------------------------------

    def _due(self, idx: _Index, now: float) -> bool:
        if idx.records > self.max_items + max(16, self.max_items // 10):
            return True
        oldest = min((r.meta.time for r in idx.live.values()), default=now)
        grace = min(86_400.0, self.retention_s * 0.01)
        return oldest < now - self.retention_s - grace

    def _compact(self, f: BinaryIO, idx: _Index, now: float) -> None:
        """Copy the visible frames (checksums included, bytes unchanged) to a
        temp file, fsync, rename over the log, fsync the directory."""
        keep = self._visible(idx, now)
        tmp = self.path / (LOG_NAME + ".tmp")
        with open(tmp, "wb") as out:
            for rec in keep:
                f.seek(rec.offset)
                out.write(f.read(rec.end - rec.offset))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self._log)
        dfd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        log.info(
            "feedback_store_compacted", path=str(self._log), kept=len(keep), records=idx.records
        )


__all__ = ["FeedbackItem", "FeedbackStore", "StoreError", "body_hash", "decided", "kind_of"]
