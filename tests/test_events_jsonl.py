"""The embedded JSON-lines sink: written off the loop, rotated, never blocking."""

from __future__ import annotations

from pathlib import Path

import msgspec
from test_events_schema import record

from proxy.events import EventShipper, decode_event, make_event_sink
from proxy.jsonl_sink import JsonlSink
from proxy.settings import EventsSettings


def jsonl_settings(tmp_path: Path, **kw: object) -> EventsSettings:
    base: dict[str, object] = {
        "jsonl_path": str(tmp_path / "events" / "events.jsonl"),
        "spool_dir": str(tmp_path / "spool"),
        "fsync": "never",
    }
    base.update(kw)
    return msgspec.convert(base, EventsSettings)


def read_events(path: Path) -> list[str]:
    """queue ids of every line in the file and its rotations, oldest first."""
    files = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    ids = []
    for f in [*files, path]:
        for line in f.read_bytes().splitlines():
            ids.append(decode_event(line).queue_id)
    return ids


def test_default_without_kafka_is_the_jsonl_file(tmp_path: Path) -> None:
    assert isinstance(make_event_sink(jsonl_settings(tmp_path)), JsonlSink)
    kafka = jsonl_settings(tmp_path, bootstrap_servers=["127.0.0.1:9"])
    assert isinstance(make_event_sink(kafka), EventShipper)


async def test_events_are_written_one_per_line(tmp_path: Path) -> None:
    s = jsonl_settings(tmp_path)
    sink = JsonlSink(s, instance_id="t")
    await sink.start()
    for i in range(1000):
        sink.record(record(queue_id=f"Q{i}"))
    await sink.close()
    assert sink.written == 1000 and sink.dropped == 0
    assert read_events(Path(s.jsonl_path)) == [f"Q{i}" for i in range(1000)]


async def test_file_rotates_and_keeps_jsonl_keep_files(tmp_path: Path) -> None:
    s = jsonl_settings(tmp_path, jsonl_max_bytes=8192, jsonl_keep=3)
    sink = JsonlSink(s, instance_id="t")
    await sink.start()
    n = 400  # about 200 KiB of events: many rotations
    for i in range(n):
        sink.record(record(queue_id=f"Q{i}"))
    await sink.close()
    path = Path(s.jsonl_path)
    rotated = sorted(p.name for p in path.parent.glob("events.jsonl.*"))
    assert rotated == ["events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    assert sink.rotations > 3
    for p in [path, *path.parent.glob("events.jsonl.*")]:
        assert p.stat().st_size <= 8192
    # The newest events survive, in order, with no gap: the oldest files went.
    ids = read_events(path)
    assert ids == [f"Q{i}" for i in range(n - len(ids), n)]
    assert len(ids) < n


async def test_queue_full_drops_are_counted_and_record_never_blocks(tmp_path: Path) -> None:
    s = jsonl_settings(tmp_path, queue_size=10, high_water=5)
    sink = JsonlSink(s, instance_id="t")
    await sink.start()
    for i in range(25):  # no await in between: the writer task cannot run
        sink.record(record(queue_id=f"Q{i}"))
    await sink.close()
    sink.record(record(queue_id="late"))
    await sink.close()  # a second close is harmless
    assert (sink.written, sink.dropped) == (10, 16)
    assert read_events(Path(s.jsonl_path)) == [f"Q{i}" for i in range(10)]
