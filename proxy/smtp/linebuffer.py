"""The client's bytes as the SMTP session reads them: command lines, the
PROXY header and DATA bodies, for the one coroutine that reads them.

Filled from the protocol's data_received, with no StreamReader in between:
asyncio's StreamReader (its feed_data, readuntil, waiter and the
StreamReaderProtocol and StreamWriter around it) cost about a fifth of the
relay's Python per message (bench/results/cpu_profile.md). Reading is
bounded: past `high_water` buffered bytes the transport stops reading until
the session takes them, so a client that sends faster than we relay never
grows this buffer without bound; a reader waiting for more always gets it.
"""

from __future__ import annotations

import asyncio


class ClientGone(Exception):
    """The client closed its side or the connection was lost."""


class LineBuffer:
    __slots__ = ("_buf", "_eof", "_loop", "_reading_paused", "_transport", "_waiter", "high_water")

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        # Above this many buffered bytes the transport stops reading until
        # the session takes some. The session raises it while it reads a
        # DATA body in large chunks.
        self._buf = bytearray()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._transport: asyncio.BaseTransport | None = None
        self._reading_paused = False
        self.high_water = high_water

    # -- the protocol's side ------------------------------------------------

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """The transport to pause and resume (a new one after STARTTLS)."""
        self._transport = transport
        self._reading_paused = False

    def detach(self) -> None:
        """The connection is gone: forget its transport (no cycle through
        the transport back to the protocol that owns this buffer)."""
        self._transport = None

    def feed(self, data: bytes) -> None:
        self._buf += data
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if len(self._buf) > self.high_water and not self._reading_paused:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                self._reading_paused = True
                transport.pause_reading()  # type: ignore[attr-defined]

    def feed_eof(self) -> None:
        self._eof = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        """Forget what was buffered (RFC 3207 4.2: plaintext sent before
        the TLS handshake is never read as commands)."""
        self._buf.clear()
        self._resume()

    # -- the session's side --------------------------------------------------

    async def line(self, limit: int) -> bytes | None:
        """The next line through its LF; None for a line longer than `limit`
        bytes before its LF, which is read and dropped through its LF."""
        buf = self._buf
        too_long = False
        searched = 0
        while True:
            end = buf.find(b"\n", searched)
            if end >= 0:
                if too_long or end > limit:
                    del buf[: end + 1]
                    self._resume()
                    return None
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                self._resume()
                return line
            if len(buf) > limit:
                too_long = True
                buf.clear()
                self._resume()
            searched = len(buf)
            await self._more()

    async def until(self, marker: bytes, max_chunk: int) -> tuple[bytes, bool]:
        """(bytes, True) through the first `marker`, or (bytes, False): up to
        `max_chunk` bytes that certainly come before it."""
        buf = self._buf
        searched = 0  # the marker does not start before this (buf only grows while we wait)
        while True:
            at = buf.find(marker, searched)
            if 0 <= at <= max_chunk:
                end = at + len(marker)
                chunk = bytes(buf[:end])
                del buf[:end]
                self._resume()
                return chunk, True
            # No marker yet: all but its last len(marker) - 1 bytes are body.
            safe = min(len(buf) - (len(marker) - 1), max_chunk)
            if at > max_chunk or safe >= max_chunk:
                chunk = bytes(buf[:max_chunk])
                del buf[:max_chunk]
                self._resume()
                return chunk, False
            searched = max(0, len(buf) - len(marker) + 1)
            await self._more()

    async def exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            await self._more()
        chunk = bytes(buf[:n])
        del buf[:n]
        self._resume()
        return chunk

    def insert_front(self, data: bytes) -> None:
        self._buf[0:0] = data

    async def _more(self) -> None:
        if self._eof:
            raise ClientGone("client closed the connection")
        if self._reading_paused:  # waiting for more: what is held is too little
            self._reading_paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()  # type: ignore[attr-defined]
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        if self._reading_paused and len(self._buf) <= self.high_water:
            self._reading_paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()  # type: ignore[attr-defined]
