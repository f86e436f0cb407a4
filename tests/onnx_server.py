"""A real triaged server on the ONNX classifier, for the classifier's SMTP tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from conftest import CaptureServer, base_settings

from classifier.types import Classifier
from proxy.server import Server
from proxy.settings import Settings


def onnx_settings(capture: CaptureServer, model: Path, **classifier: Any) -> Settings:
    """Test settings with the ONNX classifier on `model`, an inference process
    by default; the pipeline reads the same section (timeout_ms)."""
    return base_settings(capture.url, classifier={
        "kind": "onnx", "model_path": str(model), "provider": "cpu", "runner": "process",
        **classifier,
    })


@contextlib.asynccontextmanager
async def served(settings: Settings, classifier: Classifier | None = None) -> AsyncIterator[Server]:
    """Start a Server (it builds its own classifier, reporting to its
    prometheus metrics, unless one is given); stop it once its clients left."""
    srv = Server(settings, classifier=classifier)
    await srv.start()
    try:
        yield srv
    finally:
        # These tests are not about draining: stop once the clients' closes
        # have reached the server, so no session is cut off.
        deadline = time.monotonic() + 10.0
        while srv.ctx is not None and srv.ctx.connections:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        await srv.stop(drain_timeout_s=1.0)
