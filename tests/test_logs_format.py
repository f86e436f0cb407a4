"""proxy/logs.py JsonLine writes what structlog's standard JSON chain wrote
(add_log_level, TimeStamper iso/utc, format_exc_info, JSONRenderer): same
keys in the same order, same values, same timestamp format."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from proxy import logs
from proxy.settings import LoggingSettings

_REFERENCE = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
    structlog.processors.JSONRenderer(serializer=lambda o, **_: msgspec.json.encode(o, enc_hook=str).decode()),
]
_ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")


def _reference(method: str, event: dict[str, Any]) -> str:
    out: Any = event
    for processor in _REFERENCE:
        out = processor(None, method, out)
    assert isinstance(out, str)
    return out


def test_same_lines_as_the_standard_chain() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc = sys.exc_info()
        cases: list[tuple[str, dict[str, Any]]] = [
            ("info", {"event": "transaction", "peer": "192.0.2.1", "score": 0.912, "spam": None,
                      "size": 4200, "path": Path("/var/x")}),
            ("warning", {"event": "upstream_failed", "stage": "rcpt"}),
            ("warn", {"event": "w"}),
            ("exception", {"event": "session_error", "exc_info": True}),
            ("error", {"event": "e", "exc_info": exc}),
            ("info", {"event": "no_exception", "exc_info": None}),
        ]
        line = logs.JsonLine()
        for method, event in cases:
            ours = json.loads(line(None, method, dict(event)))
            theirs = json.loads(_reference(method, dict(event)))
            ours_ts, theirs_ts = ours.pop("timestamp"), theirs.pop("timestamp")
            assert ours == theirs and list(ours) == list(theirs)
            assert _ISO_Z.match(ours_ts) and _ISO_Z.match(theirs_ts)
            assert ours_ts[:16] == theirs_ts[:16] or ours_ts[:13] != theirs_ts[:13]  # same minute


def test_timestamp_follows_the_clock(monkeypatch: Any) -> None:
    line = logs.JsonLine()
    now = [1_764_610_992_123_456_789]
    monkeypatch.setattr(logs.time, "time_ns", lambda: now[0])
    assert line.timestamp() == "2025-12-01T17:43:12.123456Z"
    now[0] += 1_000_000_000  # the cached second must move on
    assert line.timestamp() == "2025-12-01T17:43:13.123456Z"
    now[0] = 1_764_610_993_000_000_000  # whole second: no fraction, like isoformat()
    assert line.timestamp() == "2025-12-01T17:43:13Z"


def test_configured_json_logger_writes_one_line() -> None:
    out = io.StringIO()
    root, mail = logging.getLogger(), logging.getLogger("mail.log")
    saved = (root.handlers[:], root.level, mail.level, structlog.get_config())
    logs.configure(LoggingSettings(format="json", level="info"), stream=out)
    try:
        structlog.get_logger("t").info("transaction", queue_id="q1", size=10)
        structlog.get_logger("t").debug("hidden")
    finally:
        root.handlers[:], _, _, config = saved
        root.setLevel(saved[1])
        mail.setLevel(saved[2])
        structlog.configure(**config)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got["event"] == "transaction" and got["queue_id"] == "q1" and got["level"] == "info"
    assert _ISO_Z.match(got["timestamp"])
