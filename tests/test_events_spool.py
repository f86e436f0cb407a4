"""The event spool on a real directory: framing, order, bounds, crash recovery."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.spool import Spool, SpoolLocked, frame_size


def rec(i: int, size: int = 40) -> tuple[bytes, bytes, int]:
    return (b"k%d" % i, (b"v%d-" % i).ljust(size, b"x"), 1_700_000_000_000 + i)


def open_spool(path: Path, **kw: object) -> Spool:
    args: dict[str, object] = {"max_bytes": 1 << 20, "segment_bytes": 4096, "fsync": "never"}
    args.update(kw)
    s = Spool(path, **args)  # type: ignore[arg-type]
    s.open()
    return s


def drain(s: Spool, chunk: int = 7) -> list[tuple[bytes, bytes, int]]:
    out = []
    while s.pending:
        got = s.read(chunk)
        assert got, "pending records but read() returned none"
        s.ack(got[-1], len(got))
        out += [(r.key, r.value, r.timestamp_ms) for r in got]
    return out


def segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.seg"))


def test_records_come_back_in_order_across_segments(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    records = [rec(i) for i in range(500)]
    assert s.append(records[:123]) == 123
    assert s.append(records[123:]) == 377
    assert len(segments(tmp_path)) > 3  # 4 KiB segments: rotation happened
    assert s.pending == 500
    assert s.bytes == sum(frame_size(k, v) for k, v, _ in records)
    assert drain(s) == records
    assert s.pending == 0 and s.bytes == 0
    assert segments(tmp_path) == []  # drained: every file deleted


def test_acked_segments_are_deleted_as_replay_advances(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    s.append([rec(i) for i in range(300)])
    before = segments(tmp_path)
    first = s.read(100)
    s.ack(first[-1], 100)
    after = segments(tmp_path)
    assert before[0] not in after and len(after) < len(before)
    assert s.bytes == sum((tmp_path / n).stat().st_size for n in after)


def test_bound_in_bytes_accepts_an_exact_prefix(tmp_path: Path) -> None:
    one = frame_size(*rec(0)[:2])
    s = open_spool(tmp_path, max_bytes=one * 10 + one // 2)
    assert s.append([rec(i) for i in range(25)]) == 10
    assert s.append([rec(99)]) == 0
    assert s.pending == 10
    # Space comes back once records are acked (drained spool starts afresh).
    drain(s)
    assert s.append([rec(i) for i in range(4)]) == 4


def test_reopen_replays_only_what_was_not_acked(tmp_path: Path) -> None:
    records = [rec(i) for i in range(200)]
    s = open_spool(tmp_path)
    s.append(records)
    got = s.read(70)
    s.ack(got[-1], 70)
    s.close()
    s2 = open_spool(tmp_path)
    assert s2.pending == 130
    s2.append([rec(1000)])
    assert drain(s2) == [*records[70:], rec(1000)]


def test_torn_tail_is_cut_off_on_open(tmp_path: Path) -> None:
    s = open_spool(tmp_path, segment_bytes=1 << 20)
    s.append([rec(i) for i in range(10)])
    s.close()
    seg = tmp_path / segments(tmp_path)[0]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")  # a frame header promising 256 bytes, then a crash
    s2 = open_spool(tmp_path, segment_bytes=1 << 20)
    assert seg.stat().st_size == size
    assert s2.corrupt_frames == 1
    s2.append([rec(10)])
    assert drain(s2) == [rec(i) for i in range(11)]


def test_bad_crc_in_an_older_segment_ends_that_segment(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    s.append([rec(i) for i in range(200)])
    s.close()
    first = tmp_path / segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    one = frame_size(*rec(0)[:2])
    in_first = len(data) // one
    data[one * 2 + 20] ^= 0xFF  # flip a payload byte of the third record
    first.write_bytes(bytes(data))
    s2 = open_spool(tmp_path)
    assert s2.corrupt_frames == 1
    out = drain(s2)
    assert out[:2] == [rec(0), rec(1)]
    assert out[2:] == [rec(i) for i in range(in_first, 200)]


def test_fsync_always_and_interval_write_the_same_bytes(tmp_path: Path) -> None:
    for policy in ("always", "interval"):
        d = tmp_path / policy
        s = open_spool(d, fsync=policy, fsync_interval_s=0.001)
        s.append([rec(i) for i in range(50)])
        assert not s.dirty or policy == "interval"
        s.sync()
        assert not s.dirty
        s.close()
    a = b"".join((tmp_path / "always" / n).read_bytes() for n in segments(tmp_path / "always"))
    b = b"".join((tmp_path / "interval" / n).read_bytes() for n in segments(tmp_path / "interval"))
    assert a == b and len(a) > 0


def test_one_owner_per_directory(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    with pytest.raises(SpoolLocked):
        open_spool(tmp_path)
    s.close()
    open_spool(tmp_path).close()  # released on close


def test_files_are_private(tmp_path: Path) -> None:
    s = open_spool(tmp_path)
    s.append([rec(1)])
    s.close()
    mode = os.stat(tmp_path / segments(tmp_path)[0]).st_mode & 0o777
    assert mode == 0o600


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 60), st.integers(0, 300)),
        st.tuples(st.just("ack"), st.integers(1, 80), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_spool_behaves_like_a_bounded_fifo(tmp_path_factory: object, script: list[tuple[str, int, int]]) -> None:
    path = tmp_path_factory.mktemp("spool")  # type: ignore[attr-defined]
    max_bytes = 6000
    s = open_spool(path, max_bytes=max_bytes, segment_bytes=1024)
    model: deque[tuple[bytes, bytes, int]] = deque()
    n = 0
    for op, a, b in script:
        if op == "append":
            batch = [rec(n + i, size=b) for i in range(a)]
            n += a
            # The prefix that fits under max_bytes, counting what is on disk
            # (acked records in a segment still being written occupy space).
            used = s.bytes
            fit = 0
            for k, v, _ in batch:
                if used + frame_size(k, v) > max_bytes:
                    break
                used += frame_size(k, v)
                fit += 1
            got = s.append(batch)
            assert got == fit
            model.extend(batch[:got])
        elif op == "ack":
            got_recs = s.read(a)
            assert [(r.key, r.value, r.timestamp_ms) for r in got_recs] == list(model)[: len(got_recs)]
            if got_recs:
                s.ack(got_recs[-1], len(got_recs))
                for _ in got_recs:
                    model.popleft()
        else:
            s.close()
            s = open_spool(path, max_bytes=max_bytes, segment_bytes=1024)
        assert s.pending == len(model)
        assert sum(frame_size(k, v) for k, v, _ in model) <= s.bytes <= max_bytes
    assert drain(s) == list(model)
    assert segments(path) == []
