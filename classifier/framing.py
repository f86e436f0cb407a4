"""Length-prefixed frames (a 4-byte big-endian length, then the payload) out
of a byte stream that arrives in pieces: the parent's end of the inference
process (classifier/worker_wire.py) and a worker's end of the inference
service (classifier/serving/service_wire.py) both read them on the loop."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Generic, TypeVar

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
