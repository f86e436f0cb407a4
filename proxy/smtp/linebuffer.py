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
        self._wake()
        if len(self._buf) > self.high_water and not self._reading_paused:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                self._reading_paused = True
                transport.pause_reading()  # type: ignore[attr-defined]

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def clear(self) -> None:
        """Forget what was buffered (RFC 3207 4.2: plaintext sent before
        the TLS handshake is never read as commands)."""
        self._buf.clear()
        if self._reading_paused:
            self._resume_reading()

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
                line = self._take(end + 1)
                return None if too_long or end > limit else line
            if len(buf) > limit:
                too_long = True
                buf.clear()
                if self._reading_paused:
                    self._resume_reading()
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
                return self._take(at + len(marker)), True
            # No marker yet: all but its last len(marker) - 1 bytes are body.
            searched = max(0, len(buf) - len(marker) + 1)
            if at > max_chunk or searched >= max_chunk:
                return self._take(max_chunk), False
            await self._more()

    async def exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            await self._more()
        return self._take(n)

    def insert_front(self, data: bytes) -> None:
        self._buf[0:0] = data

    async def _more(self) -> None:
        if self._eof:
            raise ClientGone("client closed the connection")
        if self._reading_paused:  # waiting for more: what is held is too little
            self._resume_reading()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        """The first `n` buffered bytes, removed."""
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        if self._reading_paused and len(self._buf) <= self.high_water:
            self._resume_reading()
        return chunk

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]
