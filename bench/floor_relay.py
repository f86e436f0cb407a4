"""The leanest relay Python on uvloop allows: the CPU floor of relaying (issue 13).

Not a product and not a baseline to beat: a yardstick. It does only what
any before-queue relay must do per message, with nothing a mail filter
needs: the client's MAIL and each RCPT forwarded to the next hop as they
arrive and its reply passed back, DATA gathered and sent on, the next hop's
final reply passed back, upstream sessions pooled and RSET between
transactions. No parsing beyond the command verb, no timeouts, no limits,
no logging, no events, no metrics, no classifying. Callbacks on
asyncio.Protocol only (no StreamReader, no task or coroutine per command),
so what it costs per message is the event loop and the system calls.

    .venv/bin/python bench/floor_relay.py --listen 127.0.0.1:10030 --upstream 127.0.0.1:10026

bench/cpu_floor.py sets its CPU per message beside triaged's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import deque
from collections.abc import Callable

import uvloop

Line = bytes
OnReply = Callable[[Line], None]


class Upstream(asyncio.Protocol):
    """One pooled next-hop session: commands out, final reply lines to callbacks in order."""

    def __init__(self, on_ready: Callable[[Upstream], None]) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        # The greeting, then the EHLO reply, before the session is handed out.
        self.waiters: deque[OnReply] = deque([self._greeted])
        self._on_ready = on_ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _greeted(self, line: Line) -> None:
        self.command(b"EHLO floor\r\n", lambda _reply: self._on_ready(self))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\n")) >= 0:
            line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
            if line[3:4] != b"-":  # the last line of a reply
                self.waiters.popleft()(line)

    def command(self, data: bytes, on_reply: OnReply) -> None:
        assert self.transport is not None
        self.waiters.append(on_reply)
        self.transport.write(data)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Upstream] = []
        self.connecting: set[asyncio.Task[object]] = set()  # held until done (the loop keeps weak refs)

    def lease(self, then: Callable[[Upstream], None]) -> None:
        if self.idle:
            then(self.idle.pop())
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: Upstream(then), self.host, self.port))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)


class Front(asyncio.Protocol):
    """One client connection."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.buf = b""
        self.body: list[bytes] | None = None  # between 354 and the final dot
        self.hop: Upstream | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reply(b"220 floor ESMTP\r\n")

    def reply(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            if self.body is not None:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    self.body.append(self.buf)
                    self.buf = b""
                    return
                self.body.append(self.buf[: end + 5])
                self.buf = self.buf[end + 5 :]
                self.send_body(b"".join(self.body))
                self.body = None
                continue
            end = self.buf.find(b"\n")
            if end < 0:
                return
            line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
            self.command(line)

    def command(self, line: bytes) -> None:
        # smtp-source waits for each reply (no pipelining), so RCPT always
        # finds the lease MAIL took; a pipelining client would need a queue.
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            self.reply(b"250-floor\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n")
        elif verb == b"MAIL":
            def leased(hop: Upstream) -> None:
                self.hop = hop
                hop.command(line, self.reply)
            self.pool.lease(leased)
        elif verb == b"RCPT" and self.hop is not None:
            self.hop.command(line, self.reply)
        elif verb == b"DATA":
            self.body = []
            self.reply(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            self.reply(b"221 bye\r\n")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply(b"250 ok\r\n")

    def send_body(self, body: bytes) -> None:
        hop = self.hop
        assert hop is not None
        hop.command(b"DATA\r\n", lambda _354: hop.command(body, self.finished))

    def finished(self, line: Line) -> None:
        hop, self.hop = self.hop, None
        assert hop is not None
        self.reply(line)
        hop.command(b"RSET\r\n", lambda _ok: self.pool.idle.append(hop))


async def serve(listen: str, upstream: str) -> None:
    host, _, port = listen.rpartition(":")
    up_host, _, up_port = upstream.rpartition(":")
    pool = Pool(up_host, int(up_port))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(pool), host, int(port), backlog=1024)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.upstream))


if __name__ == "__main__":
    main()
