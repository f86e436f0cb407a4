"""A capturing SMTP sink for the Postfix, DKIM and corpus tests.

It runs aiosmtpd on its own event loop in a daemon thread, so that blocking
test code (smtplib, subprocess calls to postfix) and asyncio test code can
both use it. It binds port 0 and reports the port it got (no fixed ports).

What it stores is exactly what aiosmtpd hands a DATA handler in
`envelope.original_content`: the message after SMTP transparency is undone
(RFC 5321 4.5.2 dot-unstuffing), with the CRLF line endings it arrived with,
without the terminating "." line. Nothing is decoded or re-serialised.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Delivery:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    data: bytes
    peer: str


class _LongLineSMTP(SMTP):
    # The SpamAssassin corpus has lines of up to 48 KiB (RFC 5321 says 1000);
    # a sink must not be the hop that refuses them.
    line_length_limit = 1 << 20


@dataclass
class _Handler:
    deliveries: list[Delivery] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        delivery = Delivery(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            data=bytes(envelope.original_content or b""),
            peer=str(session.peer[0]) if session.peer else "",
        )
        with self.cond:
            self.deliveries.append(delivery)
            self.cond.notify_all()
        return "250 2.0.0 Ok: captured"


class SmtpSink:
    """`with SmtpSink() as sink:` ... `sink.port`, `sink.wait_for(n)`."""

    def __init__(self, host: str = "127.0.0.1", hostname: str = "sink.test") -> None:
        self.host = host
        self.port = 0
        self._hostname = hostname
        self._handler = _Handler()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> SmtpSink:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        self.port = fut.result(timeout=10)
        return self

    async def _serve(self) -> int:
        def factory() -> SMTP:
            return _LongLineSMTP(
                self._handler,
                data_size_limit=None,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=self._hostname,
                loop=self._loop,
            )

        self._server = await self._loop.create_server(factory, self.host, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                # Do not wait_closed(): Postfix may keep a cached connection open.

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def deliveries(self) -> list[Delivery]:
        with self._handler.cond:
            return list(self._handler.deliveries)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Delivery]:
        """Block until at least `count` messages arrived; the list, or TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._handler.cond:
            while len(self._handler.deliveries) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink got {len(self._handler.deliveries)} of {count} messages"
                    )
                self._handler.cond.wait(left)
            return list(self._handler.deliveries)

    async def async_wait_for(self, count: int, wait_s: float = 30.0) -> list[Delivery]:
        """`wait_for` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for, count, wait_s)
