"""A front-end worker stand-in for the inference service tests, in a process
of its own: `python tests/service_client.py ENDPOINT MODEL_PATH N SEED`.

It starts an OnnxClassifierService with runner = "service", prints "ready",
waits for a line on stdin (so all clients start together), classifies N
messages concurrently and prints one JSON list: [category, score, spam_score,
model] per message, in order.
"""

from __future__ import annotations

import asyncio
import json
import sys

import structlog
from batching_models import tiny_message

from classifier.config import BatcherSettings, ClassifierSettings
from classifier.service import OnnxClassifierService

KINDS = ("primary", "updates", "forums", "spam")


def messages(n: int, seed: int) -> list[bytes]:
    return [tiny_message(KINDS[i % 4], i, seed) for i in range(n)]


async def main(endpoint: str, model: str, n: int, seed: int) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: results
    settings = ClassifierSettings(model_path=model, runner="service", endpoint=endpoint,
                                  timeout_ms=30_000, batcher=BatcherSettings(max_batch_size=8))
    service = OnnxClassifierService(settings)
    await service.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    results = await asyncio.gather(*(service.classify(m) for m in messages(n, seed)))
    await service.close()
    print(json.dumps([[r.category, r.score, r.spam_score, r.model] for r in results]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
