"""structlog set-up: JSON lines when not on a TTY (journald, containers),
human-readable console on a TTY. Never log bodies or full addresses."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec
import structlog

from proxy.settings import LoggingSettings

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


# Values structlog cannot put in JSON as they are (an exception, a Path) are
# written as their str(), as before.
_JSON = msgspec.json.Encoder(enc_hook=str)


class JsonLine:
    """`add_log_level`, `TimeStamper(fmt="iso", utc=True)`, `format_exc_info`
    and `JSONRenderer` in one processor, with the same output.

    The JSON path logs a canonical line per transaction (DESIGN.md 8): four
    processors and a datetime per line cost about 10 us of the event loop per
    message. Here the ISO seconds are formatted once per second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        event_dict["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event_dict["timestamp"] = self.timestamp()
        if "exc_info" in event_dict:
            event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
        return _JSON.encode(event_dict).decode()

    def timestamp(self) -> str:
        """What TimeStamper(fmt="iso", utc=True) writes: 2026-12-01T17:43:12.123456Z
        (no fraction when the microseconds are 0, as datetime.isoformat)."""
        second, ns = divmod(time.time_ns(), 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micro = ns // 1000
        return f"{self._prefix}.{micro:06d}Z" if micro else f"{self._prefix}Z"


# structlog's add_log_level: "warn" is an alias, exception() logs at error.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


def configure(settings: LoggingSettings, *, stream: Any = None, fields: dict[str, Any] | None = None) -> None:
    """`fields` go into every line (a worker process adds its slot: `worker`)."""
    stream = stream or sys.stderr
    level = _LEVELS[settings.level]
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = (
        [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=stream.isatty()),
        ]
        if fmt == "console"
        else [JsonLine()]
    )
    if fields:
        processors.insert(0, _add_fields(dict(fields)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging; without a handler Python prints
    # their warnings as plain text into our JSON stream. Route them through
    # structlog instead, warnings and up.
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(logging.WARNING)
    # aiosmtpd ("mail.log") logs every command at INFO, and its warnings carry
    # raw client bytes (the peer, unrecognised commands): see _StructlogHandler.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def _add_fields(fields: dict[str, Any]) -> Any:
    def add(_logger: Any, _method: str, event: Any) -> Any:
        for key, value in fields.items():
            event.setdefault(key, value)
        return event

    return add


class _StructlogHandler(logging.Handler):
    """stdlib records as structlog events, one JSON line each.

    aiosmtpd's records keep only their format string (`template`), never the
    arguments: those are raw client bytes (DESIGN.md 8). Our own session logs
    what matters about a client in its own events.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            level = record.levelname.lower()
            if record.name == "mail.log" or record.name.startswith("mail.log."):
                fields: dict[str, Any] = {"template": str(record.msg)}
                if record.exc_info and record.exc_info[0] is not None:
                    fields["error"] = record.exc_info[0].__name__
                logger.log(record.levelno, "aiosmtpd", **fields)
                return
            logger.log(
                record.levelno,
                "library_log",
                logger_name=record.name,
                level_name=level,
                message=record.getMessage(),
                exc_info=record.exc_info if record.exc_info else None,
            )
        except Exception:
            self.handleError(record)
