"""Frames between front-end workers (or InferenceHost) and the inference service.

Each frame is a 4-byte big-endian length and a msgpack-encoded tagged struct
(msgspec), the framing of the inference process (classifier/worker_wire.py):
cheap to encode, no schema compiler, and numpy arrays travel as raw bytes.

    client                                   service
    (connect)                       <-       Info (id 0: the model, its feature spec)
    Hello                           ->       (names the client in the stats)
    Classify(id, spec_id, arrays)   ->
                                    <-       Results(id, verdicts, generations)
    Ping / GetInfo / GetStats       ->       Pong / Info / Stats
    Reload(path?)                   ->       Reloaded (ok, or the error; old model kept)
    ... after a hot swap, to every connection:
                                    <-       Info (id 0), before any result of the new model

A connection carries one request at a time from a worker (its batcher runs
one batch at a time); answers carry the request's id, so a late answer to a
request the client gave up on is recognised and skipped.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from classifier.framing import FrameConnection
from classifier.serving.feature_spec import FeatureSpec
from classifier.types import Classification

_LENGTH = struct.Struct(">I")
# A Classify frame holds a worker's batch of feature arrays (a few KiB per
# message): anything near this is a corrupted stream or a hostile peer.
MAX_FRAME = 256 << 20

# Per-message failure kinds inside Results.verdicts ("kind: message").
FailureKind = Literal["error", "stale", "overloaded", "deadline"]
FAILURE_KINDS: tuple[FailureKind, ...] = ("error", "stale", "overloaded", "deadline")


class Array(msgspec.Struct, frozen=True, array_like=True):
    dtype: str  # the array's dtype (numpy's dtype.str)
    shape: list[int]
    data: memoryview  # decoded as a view into the received frame: no copy
    # How `data` is stored when not as `dtype`: token ids are int64 but fit
    # 16 bits for the default 65,536 buckets, so they travel in a quarter of
    # the bytes (2.5 KiB -> 0.6 KiB per message on the SpamAssassin corpus),
    # which counts on a TCP link to a shared GPU host.
    wire_dtype: str = ""

    @classmethod
    def of(cls, a: npt.NDArray[Any]) -> Array:
        a = np.ascontiguousarray(a)
        dtype, wire_dtype = a.dtype.str, ""
        if a.dtype.kind in "iu" and a.dtype.itemsize > 2 and a.size:
            low, high = int(a.min()), int(a.max())
            narrow = next((t for t in (np.uint16, np.int32)
                           if np.iinfo(t).min <= low and high <= np.iinfo(t).max
                           and np.dtype(t).itemsize < a.dtype.itemsize), None)
            if narrow is not None:
                a = a.astype(narrow)
                wire_dtype = a.dtype.str
        return cls(dtype, list(a.shape), a.reshape(-1).view(np.uint8).data, wire_dtype)

    def array(self) -> npt.NDArray[Any]:
        stored = np.frombuffer(self.data, dtype=np.dtype(self.wire_dtype or self.dtype))
        if self.wire_dtype:
            stored = stored.astype(np.dtype(self.dtype))
        return stored.reshape(self.shape)


# -- client -> service ----------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag=True):
    client: str  # "worker 1234": how the stats name this connection


class Classify(msgspec.Struct, frozen=True, tag=True):
    id: int
    spec_id: str  # FeatureSpec.id the arrays were built for
    timeout_ms: float  # past it the service answers "deadline" and skips the item
    arrays: list[Array]


class Ping(msgspec.Struct, frozen=True, tag=True):
    id: int


class GetInfo(msgspec.Struct, frozen=True, tag=True):
    id: int


class GetStats(msgspec.Struct, frozen=True, tag=True):
    id: int


class Reload(msgspec.Struct, frozen=True, tag=True):
    id: int
    # None: the file the service was started with (or last reloaded). A path
    # is taken from Unix-socket clients only: a TCP client must not make the
    # GPU host open files of its choosing.
    path: str | None = None


# -- service -> client ----------------------------------------------------------


class Info(msgspec.Struct, frozen=True, tag=True):
    id: int  # 0: pushed (on connect, after a hot swap)
    generation: int  # +1 per model loaded
    name_version: str
    provider: Literal["cuda", "cpu"]
    provider_reason: str
    device_id: int | None
    spec: FeatureSpec
    labels: list[str] | None  # the category head's classes (for the overrides)
    spam_threshold: float | None  # for the auth adjustment
    prefix_bytes: int | None  # bytes of a message the features read (None: all)
    pid: int


class Results(msgspec.Struct, frozen=True, tag=True):
    id: int
    # One per array: a verdict, or "kind: why" (FAILURE_KINDS) for that one.
    verdicts: list[Classification | str]
    # Per array: the model generation (Info.generation) that answered, 0 for
    # a failure. A request's items may straddle a hot swap.
    generations: list[int]
    model_s: float = 0.0  # the batch's model call, wall and CPU seconds
    model_cpu_s: float = 0.0


class Pong(msgspec.Struct, frozen=True, tag=True):
    id: int
    pid: int
    name_version: str


class ServiceStats(msgspec.Struct, frozen=True):
    pid: int
    name_version: str
    generation: int
    provider: str
    batches: int
    requests: int  # messages run (or refused) by the model
    # Batch size -> count.
    batch_sizes: dict[int, int]
    # Batches holding messages from more than one client connection.
    multi_client_batches: int
    # Connection label ("worker 1234 #5") -> messages it sent.
    per_connection: dict[str, int]
    connections: int  # open now
    overloaded: int
    deadline: int
    stale: int
    errors: int  # messages the model failed on (each alone)
    isolated_batches: int  # batches retried one by one after the model call raised
    reloads: int
    failed_reloads: int
    refused_clients: int  # TCP peers outside allowed_clients


class Stats(msgspec.Struct, frozen=True, tag=True):
    id: int
    stats: ServiceStats


class Reloaded(msgspec.Struct, frozen=True, tag=True):
    id: int
    ok: bool
    name_version: str  # the model serving now (the old one when not ok)
    error: str = ""


class Refused(msgspec.Struct, frozen=True, tag=True):
    """A frame the service does not take (bad frame, path over TCP, ...)."""

    id: int
    error: str


ToService = Hello | Classify | Ping | GetInfo | GetStats | Reload
ToClient = Info | Results | Pong | Stats | Reloaded | Refused

_encoder = msgspec.msgpack.Encoder()
_to_service = msgspec.msgpack.Decoder(ToService)
_to_client = msgspec.msgpack.Decoder(ToClient)


class ChannelClosed(Exception):
    """The other side closed the connection (exited, was killed, or refused us)."""


def encode(frame: ToService | ToClient) -> bytearray:
    """Length prefix and payload in one buffer (arrays are encoded in place)."""
    buf = bytearray(_LENGTH.size)
    _encoder.encode_into(frame, buf, _LENGTH.size)
    _LENGTH.pack_into(buf, 0, len(buf) - _LENGTH.size)
    return buf


def decode_to_service(payload: bytes | memoryview) -> ToService:
    frame: ToService = _to_service.decode(payload)
    return frame


def decode_to_client(payload: bytes | memoryview) -> ToClient:
    frame: ToClient = _to_client.decode(payload)
    return frame


def failure(kind: FailureKind, message: str) -> str:
    return f"{kind}: {message}"


def failure_kind(text: str) -> FailureKind:
    kind = text.partition(":")[0]
    for known in FAILURE_KINDS:
        if kind == known:
            return known
    return "error"


# -- asyncio side (the service) ---------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One frame's payload; ChannelClosed at EOF."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FRAME:
            raise ChannelClosed(f"frame of {length} bytes: stream corrupted")
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelClosed("peer closed the connection") from None


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  frame: ToService, answer: type[Any]) -> Any:
    """Send `frame` and return the first answer of type `answer` with its id
    (pushed Info frames are skipped)."""
    writer.write(encode(frame))
    await writer.drain()
    want = getattr(frame, "id", None)
    while True:
        got = decode_to_client(await read_frame(reader))
        if isinstance(got, Refused) and got.id == want:
            raise ChannelClosed(f"service refused: {got.error}")
        if isinstance(got, answer) and getattr(got, "id", None) == want:
            return got


# -- a worker's side, read by its event loop ----------------------------------------


# A worker's connection to the service: frames to the service are encoded
# (`encode`) and written, frames from it come out decoded.
ClientConnection = FrameConnection[ToClient]


async def open_client(path: str | None, host: str = "", port: int = 0) -> ClientConnection:
    """Connect to the service at a Unix socket (`path`) or else TCP `host`:`port`;
    the loop reads the connection (framing.FrameConnection)."""
    loop = asyncio.get_running_loop()

    def connection() -> ClientConnection:
        return FrameConnection(decode_to_client, MAX_FRAME, ChannelClosed)

    if path is not None:
        _, conn = await loop.create_unix_connection(connection, path)
    else:
        # asyncio and uvloop set TCP_NODELAY on TCP transports.
        _, conn = await loop.create_connection(connection, host, port)
    return conn


def arrays_of(features: Sequence[npt.NDArray[Any]]) -> list[Array]:
    return [Array.of(a) for a in features]


__all__ = [
    "Array",
    "ChannelClosed",
    "Classify",
    "ClientConnection",
    "GetInfo",
    "GetStats",
    "Hello",
    "Info",
    "Ping",
    "Pong",
    "Refused",
    "Reload",
    "Reloaded",
    "Results",
    "ServiceStats",
    "Stats",
    "ToClient",
    "ToService",
    "arrays_of",
    "decode_to_client",
    "decode_to_service",
    "encode",
    "failure",
    "failure_kind",
    "read_frame",
    "request",
]
