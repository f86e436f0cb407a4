"""The feedback store: de-duplication, label replacement, bounds, retention,
a corrupt or torn log, and two writer processes at once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from classifier.learning.store import LOG_NAME, FeedbackStore, body_hash


def msg(n: int, *, category: str | None = None, spam: bool = False, mid: bool = True) -> bytes:
    head = f"From: a{n}@example.org\r\nSubject: hello {n}\r\n"
    if mid:
        head += f"Message-ID: <m{n}@example.org>\r\n"
    if category is not None:
        head = (
            f"X-Triage-Category: {category}\r\nX-Triage-Spam: {'yes' if spam else 'no'}\r\n" + head
        )
    return f"{head}\r\nbody of message {n}\r\n".encode()


def test_add_items_kind_and_decided(tmp_path: Path) -> None:
    s = FeedbackStore(tmp_path / "fb")
    a = s.add(msg(1, category="promotions"), "personal", "alice")
    b = s.add(msg(2, category="personal"), "personal", "alice")
    c = s.add(msg(3, category="personal", spam=True), "ham", "bob")
    d = s.add(msg(4, category="personal"), "spam", "bob")
    e = s.add(msg(5), "forums", "bob")
    assert a is not None and (a.kind, a.decided) == ("correction", "promotions")
    assert b is not None and (b.kind, b.decided) == ("confirmation", "personal")
    assert c is not None and (c.kind, c.decided) == ("correction", "spam")
    assert d is not None and (d.kind, d.decided) == ("correction", "personal")
    assert e is not None and (e.kind, e.decided) == ("confirmation", None)
    items = FeedbackStore(tmp_path / "fb").items()  # a fresh instance reads the disk
    assert [i.label for i in items] == ["personal", "personal", "ham", "spam", "forums"]
    assert items[0].raw == msg(1, category="promotions")  # headers kept as received
    assert items[0].message_id == "<m1@example.org>" and items[0].user == "alice"
    assert len(s) == 5


def test_dedup_and_replace(tmp_path: Path) -> None:
    s = FeedbackStore(tmp_path)
    assert s.add(msg(1), "promotions", "u") is not None
    assert s.add(msg(1), "promotions", "u") is None  # same label: nothing written
    size = (tmp_path / LOG_NAME).stat().st_size
    assert s.add(msg(1), "personal", "u") is not None  # a later label replaces it
    assert [i.label for i in s.items()] == ["personal"]
    assert (tmp_path / LOG_NAME).stat().st_size > size
    # Same body, no Message-ID, LF instead of CRLF: the body hash finds it.
    other = msg(1, mid=False).replace(b"\r\n", b"\n")
    assert body_hash(other) == body_hash(msg(1))
    assert s.add(other, "personal", "u") is None
    assert s.add(other, "spam", "u") is not None
    assert [i.label for i in s.items()] == ["spam"]
    # Same Message-ID, another body (a re-sent copy): the same message.
    resent = msg(1).replace(b"body of message 1", b"a different body")
    assert s.add(resent, "forums", "u") is not None
    assert [(i.label, i.raw) for i in s.items()] == [("forums", resent)]


def test_bounded_oldest_dropped(tmp_path: Path) -> None:
    s = FeedbackStore(tmp_path, max_items=20)
    for n in range(100):
        s.add(msg(n), "personal", "u")
    items = s.items()
    assert [i.message_id for i in items] == [f"<m{n}@example.org>" for n in range(80, 100)]
    # Compaction keeps the file bounded: at most max_items + slack records.
    assert (tmp_path / LOG_NAME).stat().st_size < 40 * len(msg(99)) * 2


def test_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = FeedbackStore(tmp_path, retention_days=1.0)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 3 * 86_400)
    s.add(msg(1), "personal", "u")
    s.add(msg(2), "personal", "u")
    monkeypatch.setattr(time, "time", lambda: now)
    assert s.items() == [] and len(s) == 0
    old_size = (tmp_path / LOG_NAME).stat().st_size
    s.add(msg(3), "personal", "u")  # past retention + grace: the log is rewritten
    assert [i.message_id for i in s.items()] == ["<m3@example.org>"]
    assert b"message 1" not in (tmp_path / LOG_NAME).read_bytes()
    assert (tmp_path / LOG_NAME).stat().st_size < old_size


def test_torn_tail_skipped_then_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = FeedbackStore(tmp_path)
    s.add(msg(1), "personal", "u")
    s.add(msg(2), "personal", "u")
    log = tmp_path / LOG_NAME
    data = log.read_bytes()
    log.write_bytes(data[:-7])  # a crash in the middle of the second append
    assert [i.message_id for i in s.items()] == ["<m1@example.org>"]
    assert "feedback_store_corrupt_tail" in capsys.readouterr().out
    s.add(msg(3), "personal", "u")  # the writer cuts the torn record, then appends
    assert [i.message_id for i in s.items()] == ["<m1@example.org>", "<m3@example.org>"]
    assert s.add(msg(2), "personal", "u") is not None  # msg 2 was lost with the crash


def test_corrupt_middle_record_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = FeedbackStore(tmp_path)
    for n in range(3):
        s.add(msg(n), "personal", "u")
    log = tmp_path / LOG_NAME
    data = bytearray(log.read_bytes())
    second = data.find(b"TFB1", 1)
    data[second + 30] ^= 0xFF  # flip a byte inside the second record's metadata
    log.write_bytes(bytes(data))
    assert [i.message_id for i in s.items()] == ["<m0@example.org>", "<m2@example.org>"]
    assert "feedback_store_skipped_corrupt" in capsys.readouterr().out
    s.add(msg(5), "personal", "u")  # the later records are not cut
    assert len(s.items()) == 3
    # A flipped byte in a message body: that item is dropped, not returned wrong.
    data = bytearray(log.read_bytes())
    data[data.find(b"body of message 0")] ^= 0x01
    log.write_bytes(bytes(data))
    assert [i.message_id for i in s.items()] == ["<m2@example.org>", "<m5@example.org>"]


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / LOG_NAME).write_bytes(b"\x00garbage" * 1000)
    s = FeedbackStore(tmp_path)
    assert s.items() == []
    assert s.add(msg(1), "personal", "u") is not None
    assert len(s.items()) == 1


def _writer(path: str, start: int, count: int) -> None:
    s = FeedbackStore(Path(path), max_items=1000)
    for n in range(start, start + count):
        s.add(msg(n), "personal", f"user{start}")


def test_two_writer_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k * 1000, 150)) for k in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ids = {i.message_id for i in FeedbackStore(tmp_path).items()}
    want = {f"<m{n}@example.org>" for k in (1, 2) for n in range(k * 1000, k * 1000 + 150)}
    assert ids == want


def test_two_instances_see_each_other(tmp_path: Path) -> None:
    """A writer keeps its index between adds; it must still see another
    writer's appends and a compaction (a new file) that happened meanwhile."""
    a = FeedbackStore(tmp_path, max_items=20)
    b = FeedbackStore(tmp_path, max_items=20)
    assert a.add(msg(1), "personal", "u") is not None
    assert b.add(msg(2), "personal", "u") is not None
    assert a.add(msg(2), "personal", "u") is None  # b's append is seen
    assert a.add(msg(2), "spam", "u") is not None
    assert b.add(msg(2), "spam", "u") is None  # and a's label change by b
    for n in range(100, 160):  # b compacts several times
        b.add(msg(n), "personal", "u")
    assert a.add(msg(159), "personal", "u") is None
    assert a.add(msg(1), "personal", "u") is not None  # dropped by the bound: new again
    ids = [i.message_id for i in a.items()]
    assert len(ids) == 20 and ids[-1] == "<m1@example.org>" and len(set(ids)) == 20
