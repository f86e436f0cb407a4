"""Logging of the classifier's own child processes (the inference process and
the inference service): JSON lines on stderr, as `triaged serve` writes off a
terminal, so the few lines they write land in the same journal, tagged with
which process wrote them."""

from __future__ import annotations

import sys

import structlog


def configure_child_logging(process: str) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    structlog.contextvars.bind_contextvars(process=process)
