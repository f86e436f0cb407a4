"""One-shot async requests to the inference service (ping, stats, reload):
a fresh connection each, so they work across the service's restarts and never
share a worker's batch connection."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any, TypeVar

from classifier.serving import service_wire as wire
from classifier.serving.endpoints import Endpoint
from classifier.types import ClassifierError

T = TypeVar("T")

_ids = itertools.count(1)


async def call(endpoint: Endpoint, make: Any, answer: type[T], timeout_s: float) -> T:
    """Send `make(id)` to the service and return its `answer`; ClassifierError
    says why there is none (unreachable, refused, closed, too slow)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            if endpoint.is_unix:
                reader, writer = await asyncio.open_unix_connection(endpoint.path)
            else:
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got: T = await wire.request(reader, writer, make(next(_ids)), answer)
            return got
    except TimeoutError:
        raise ClassifierError(f"inference service {endpoint}: no answer in {timeout_s:g} s") from None
    except (OSError, wire.ChannelClosed, ValueError) as exc:
        raise ClassifierError(f"inference service {endpoint}: {exc}") from None
    finally:
        if writer is not None:
            writer.close()


async def ping(endpoint: Endpoint, timeout_s: float = 2.0) -> wire.Pong | None:
    """The service's Pong, or None when it does not answer in time."""
    try:
        return await call(endpoint, wire.Ping, wire.Pong, timeout_s)
    except ClassifierError:
        return None


async def stats(endpoint: Endpoint, timeout_s: float = 5.0) -> wire.ServiceStats:
    answer = await call(endpoint, wire.GetStats, wire.Stats, timeout_s)
    return answer.stats


async def reload(endpoint: Endpoint, path: str | None, timeout_s: float) -> str:
    """The new model's name_version; ClassifierError with the service's reason
    when it kept the old model."""
    answer = await call(endpoint, lambda i: wire.Reload(i, path), wire.Reloaded, timeout_s)
    if not answer.ok:
        raise ClassifierError(answer.error)
    return answer.name_version


__all__ = ["call", "ping", "reload", "stats"]
