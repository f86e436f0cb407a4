"""Write flow control for a protocol that writes on its transport directly
(no StreamWriter): the SMTP session's replies and the next-hop client's
commands and message bodies."""

from __future__ import annotations

import asyncio


class WriteFlow:
    """asyncio.Protocol's pause_writing/resume_writing, and a wait until the
    transport's buffer has drained below its low-water mark."""

    _paused = False  # the transport's buffer is above its high-water mark
    _drained: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain_writes(self, transport: asyncio.BaseTransport | None, loop: asyncio.AbstractEventLoop) -> None:
        """Until `transport`'s buffer has drained; ConnectionResetError once
        it is closing (as StreamWriter.drain())."""
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        if self._paused:
            drained: asyncio.Future[None] = loop.create_future()
            self._drained = drained
            await drained

    def _drain_lost(self) -> None:
        """The connection is gone: a writer waiting to drain fails."""
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(ConnectionResetError("connection lost"))
