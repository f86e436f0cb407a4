"""structlog set-up: JSON lines when not on a TTY (journald, containers),
human-readable console on a TTY. Never log bodies or full addresses."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from proxy.settings import LoggingSettings

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _json_dumps(obj: Any, **kwargs: Any) -> str:
    import msgspec

    return msgspec.json.encode(obj, enc_hook=str).decode()


def configure(settings: LoggingSettings, *, stream: Any = None) -> None:
    stream = stream or sys.stderr
    level = _LEVELS[settings.level]
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json_dumps)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # aiosmtpd logs every command at INFO through stdlib logging ("mail.log"):
    # with peers and addresses. Keep only its warnings and errors.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
