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
    # Libraries log through stdlib logging; without a handler Python prints
    # their warnings as plain text into our JSON stream. Route them through
    # structlog instead, warnings and up.
    root = logging.getLogger()
    root.handlers[:] = [_StructlogHandler()]
    root.setLevel(logging.WARNING)
    # aiosmtpd ("mail.log") logs every command at INFO, and its warnings carry
    # raw client bytes (the peer, unrecognised commands): see _StructlogHandler.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


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
