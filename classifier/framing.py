"""Length-prefixed frames (a 4-byte big-endian length, then the payload) out
of a byte stream that arrives in pieces: the parent's end of the inference
process (classifier/worker_wire.py) and a worker's end of the inference
service (classifier/serving/service_wire.py) both read them on the loop."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar, cast

T = TypeVar("T")

LENGTH = struct.Struct(">I")


class FrameTooLarge(ValueError):
    """A length no real frame has: the stream is corrupted."""


class FrameReader(Generic[T]):
    """feed() returns the frames completed so far, decoded; it raises
    FrameTooLarge, or ValueError (msgspec's DecodeError) on a frame that does
    not decode: either way the stream cannot be trusted any more."""

    def __init__(self, decode: Callable[[bytes], T], max_frame: int) -> None:
        self._decode = decode
        self._max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[T]:
        buf = self._buf
        buf += data
        frames: list[T] = []
        start = 0
        try:
            while len(buf) - start >= LENGTH.size:
                (length,) = LENGTH.unpack_from(buf, start)
                if length > self._max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes: stream corrupted")
                end = start + LENGTH.size + length
                if len(buf) < end:
                    break
                frames.append(self._decode(bytes(buf[start + LENGTH.size:end])))
                start = end
        finally:
            if start:
                del buf[:start]
        return frames


class FrameConnection(asyncio.Protocol, Generic[T]):
    """One end of a frame stream, read by the event loop: frames are taken
    off the socket as they arrive; `receive()` waits for the next one,
    `poll()` returns those already here. A corrupted stream or a closed
    connection fails every later receive() with the error `closed` builds.

    Both wires' loop-side ends: the inference process's parent
    (classifier/process_runner.py) and a worker's connection to the
    inference service (classifier/serving/remote_runner.py).
    """

    def __init__(self, decode: Callable[[bytes], T], max_frame: int,
                 closed: Callable[[str], Exception]) -> None:
        self._reader = FrameReader(decode, max_frame)
        self._closed = closed
        self._transport: asyncio.Transport | None = None
        self._frames: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: Exception | None = None

    def write(self, frame: bytes | bytearray) -> None:
        """Send an encoded frame; the transport buffers what the socket does
        not take at once."""
        if self._transport is None or self._transport.is_closing():
            raise self._closed(str(self._lost or "connection closed"))
        self._transport.write(frame)

    async def receive(self) -> T:
        """The next frame (the caller bounds the wait)."""
        while not self._frames:
            if self._lost is not None:
                raise self._lost
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._frames.popleft()

    def poll(self) -> list[T]:
        """The frames that already arrived, without waiting."""
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def close(self) -> None:
        """Close after what was written is flushed."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._frames.extend(self._reader.feed(data))
        except ValueError as exc:  # FrameTooLarge, or a frame that does not decode
            self._lose(exc)
            self.abort()
            return
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(self._closed(f"the peer closed the connection{f': {exc}' if exc else ''}"))

    def _lose(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
