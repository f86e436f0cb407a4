"""The supervisor <-> worker control channel: msgpack frames over a socketpair.

One AF_UNIX stream socketpair per worker; the worker gets its end as an
inherited fd (`python -m proxy.worker --control-fd N`). A frame is a 4-byte
big-endian length and one msgspec msgpack message (a tagged union below).
The supervisor asks (Ping, MetricsRequest), the worker answers with the same
`seq`; the worker also speaks unasked once: Listening, when its listeners
serve (the supervisor's READY=1 waits for every worker's). EOF on either side
means the peer is gone: a worker whose supervisor vanished drains and exits.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgspec

_LEN = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024  # a worker's whole metrics exposition fits many times over


class Init(msgspec.Struct, frozen=True, tag=True):
    """Supervisor -> worker, first frame: who it is and what to serve.

    `settings` is the supervisor's validated config as msgpack (the worker
    serves exactly what the supervisor checked, even if the file changed
    since); `listener_fds[i]` are the inherited listening sockets of
    settings.server.listeners[i].
    """

    slot: int
    settings: bytes
    listener_fds: list[list[int]]
    # The file SIGHUP re-reads (proxy/reload.py); None: embedded defaults.
    config_path: str | None = None
    # The supervisor's shared inference service ("unix:PATH"), "" when none.
    inference_endpoint: str = ""


class Listening(msgspec.Struct, frozen=True, tag=True):
    """Worker -> supervisor: every listener serves (sd_notify READY=1 in one process)."""

    pid: int


class Ping(msgspec.Struct, frozen=True, tag=True):
    seq: int


class Pong(msgspec.Struct, frozen=True, tag=True):
    """Answered from the worker's event loop: the loop is responsive.
    `health`: the worker's health snapshot (proxy/health.py), when it has one."""

    seq: int
    health: dict[str, Any] = msgspec.field(default_factory=dict)


class MetricsRequest(msgspec.Struct, frozen=True, tag=True):
    seq: int


class Sample(msgspec.Struct, frozen=True, array_like=True):
    name: str
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, frozen=True, array_like=True):
    name: str
    documentation: str
    type: str
    unit: str
    samples: list[Sample]


class MetricsReply(msgspec.Struct, frozen=True, tag=True):
    seq: int
    families: list[Family]


Message = Init | Listening | Ping | Pong | MetricsRequest | MetricsReply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ChannelClosed(ConnectionError):
    """The peer closed its end (exited or crashed)."""


class Channel:
    """One end of a control socketpair on the running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, message: Message) -> None:
        body = _encoder.encode(message)
        self._writer.write(_LEN.pack(len(body)) + body)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    async def recv(self) -> Message:
        try:
            head = await self._reader.readexactly(_LEN.size)
            (size,) = _LEN.unpack(head)
            if size > MAX_FRAME:
                raise ChannelClosed(f"control frame of {size} bytes")
            body = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            raise ChannelClosed(str(exc) or "eof") from None
        try:
            return _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ChannelClosed(f"bad control frame: {exc}") from None

    def close(self) -> None:
        self._writer.close()


def collect_families(registry: Any) -> list[Family]:
    """A prometheus_client registry as plain data (the worker's answer to MetricsRequest)."""
    return [
        Family(
            m.name, m.documentation, m.type, m.unit,
            [Sample(s.name, dict(s.labels), float(s.value)) for s in m.samples],
        )
        for m in registry.collect()
    ]
