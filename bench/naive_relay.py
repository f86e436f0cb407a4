"""The baseline relay triaged is measured against (issue 2's benchmark).

What anyone would write first: aiosmtpd on uvloop, and in `handle_DATA`
send the message on with aiosmtplib, answering the client with the next
hop's reply. No classification, no stamping, no limits.

Two upstream modes:
- default: `aiosmtplib.send()`, a new upstream connection per message (the
  literal naive relay);
- `--pooled`: idle upstream sessions kept in a shared pool and reused across
  clients (what a relay does after its first optimisation).

    .venv/bin/python bench/naive_relay.py --listen 127.0.0.1:10030 --upstream 127.0.0.1:10026
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session


class NaiveRelay:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None and envelope.original_content is not None
        try:
            _, message = await aiosmtplib.send(
                envelope.original_content,
                sender=envelope.mail_from,
                recipients=envelope.rcpt_tos,
                hostname=self.host,
                port=self.port,
                timeout=60,
            )
        except aiosmtplib.SMTPResponseException as exc:
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError):
            return "451 4.4.1 next hop unavailable"
        return f"250 {message}"


class PooledRelay(NaiveRelay):
    """Idle upstream sessions kept in a shared pool and reused by any client."""

    def __init__(self, host: str, port: int, size: int = 64) -> None:
        super().__init__(host, port)
        self._idle: list[aiosmtplib.SMTP] = []
        self._size = size

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        assert envelope.mail_from is not None and envelope.original_content is not None
        client = self._idle.pop() if self._idle else None
        try:
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=60)
                await client.connect()
            _, message = await client.sendmail(
                envelope.mail_from, envelope.rcpt_tos, envelope.original_content
            )
        except aiosmtplib.SMTPResponseException as exc:
            self._release(client)
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError):
            if client is not None:
                client.close()
            return "451 4.4.1 next hop unavailable"
        self._release(client)
        return f"250 {message}"

    def _release(self, client: aiosmtplib.SMTP | None) -> None:
        if client is None or not client.is_connected:
            return
        if len(self._idle) < self._size:
            self._idle.append(client)
        else:
            client.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def serve(listen: str, upstream: str, pooled: bool) -> None:
    loop = asyncio.get_running_loop()
    up_host, up_port = _split(upstream)
    handler = (PooledRelay if pooled else NaiveRelay)(up_host, up_port)
    host, port = _split(listen)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="naive-relay.test", loop=loop), host, port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="host:port to accept on")
    parser.add_argument("--upstream", required=True, help="host:port of the next hop")
    parser.add_argument("--pooled", action="store_true", help="reuse upstream sessions from a shared pool")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.upstream, args.pooled))


if __name__ == "__main__":
    main()
