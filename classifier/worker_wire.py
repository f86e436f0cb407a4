"""The frames between triaged and its inference process, over a socketpair.

Each frame is a 4-byte big-endian length and a msgpack-encoded tagged struct.
The conversation is strictly request/answer, one at a time:

    parent                      child
    Start            ->
                     <-         Ready | Failed
    Run              ->
                     <-         Results | BatchFailed
    ...
    Stop             ->         (exits)

The child reads with blocking socket calls (`receive_in_child`); the parent
reads on its event loop (`parent_connection()`, a framing.FrameConnection in
classifier/process_runner.py), so no thread of triaged waits on the child.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

import msgspec

from classifier.framing import FrameConnection
from classifier.inference import BatchTiming
from classifier.types import Classification

_LENGTH = struct.Struct(">I")
# A frame larger than this is a bug or a corrupted stream, not a batch: the
# proxy's in-flight byte bound keeps real batches far below it.
MAX_FRAME = 1 << 31


class Start(msgspec.Struct, frozen=True, tag=True):
    model_path: str
    loader: str  # "module:function"
    provider: Literal["auto", "cpu", "cuda"]
    device_id: int
    threads: int
    overrides: bool
    trusted_authserv_ids: list[str] = msgspec.field(default_factory=list)  # classifier/auth.py
    shadow_model_path: str = ""  # classifier/shadow.py


class Ready(msgspec.Struct, frozen=True, tag=True):
    name_version: str
    provider: Literal["cuda", "cpu"]
    provider_reason: str
    device_id: int | None
    # How much of a message the model reads (inference.prefix_bytes_of);
    # None: all of it. triaged ships only that prefix in each Run.
    prefix_bytes: int | None


class Failed(msgspec.Struct, frozen=True, tag=True):
    error: str


class Run(msgspec.Struct, frozen=True, tag=True):
    # Views, not bytes: the parent encodes slices of the messages it holds
    # without copying them first, and the child decodes views into the frame
    # it received (msgspec decodes memoryview fields without a copy).
    raws: list[memoryview]


class Results(msgspec.Struct, frozen=True, tag=True):
    # A verdict, or why that one message has none (it alone fails).
    verdicts: list[Classification | str]
    timing: BatchTiming


class BatchFailed(msgspec.Struct, frozen=True, tag=True):
    error: str


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


ToChild = Start | Run | Stop
ToParent = Ready | Failed | Results | BatchFailed

_encoder = msgspec.msgpack.Encoder()
_to_child = msgspec.msgpack.Decoder(ToChild)
_to_parent = msgspec.msgpack.Decoder(ToParent)


class ChannelClosed(Exception):
    """The other side closed the socket (exited, or was killed)."""


def encode(frame: ToChild | ToParent) -> bytearray:
    """The frame as it goes on the wire: its length, then msgpack."""
    # One buffer for the length and the payload: a Run carries up to a batch
    # of message prefixes, and `header + payload` would copy all of it again.
    buf = bytearray(_LENGTH.size)
    _encoder.encode_into(frame, buf, _LENGTH.size)
    _LENGTH.pack_into(buf, 0, len(buf) - _LENGTH.size)
    return buf


def send(sock: socket.socket, frame: ToChild | ToParent) -> None:
    sock.sendall(encode(frame))


# The parent's end of the socketpair, read by its event loop.
ParentConnection = FrameConnection[ToParent]


def parent_connection() -> ParentConnection:
    """A protocol factory for the parent's end (loop.create_unix_connection)."""
    return FrameConnection(_to_parent.decode, MAX_FRAME, ChannelClosed)


def receive_in_child(sock: socket.socket) -> ToChild:
    frame: ToChild = _to_child.decode(_receive(sock))
    return frame


def receive_in_parent(sock: socket.socket) -> ToParent:
    frame: ToParent = _to_parent.decode(_receive(sock))
    return frame


def _receive(sock: socket.socket) -> memoryview:
    (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise ChannelClosed(f"frame of {length} bytes: stream corrupted")
    return _exactly(sock, length)


def _exactly(sock: socket.socket, n: int) -> memoryview:
    buf = memoryview(bytearray(n))
    got = 0
    while got < n:
        read = sock.recv_into(buf[got:])
        if read == 0:
            raise ChannelClosed("inference process closed its end")
        got += read
    return buf
