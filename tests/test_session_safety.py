"""Session safety on both event loops (issue 9): drain on SIGTERM, refused
connections, SMTP smuggling, hostile addresses, pool starvation by idle
clients, and the log lines of refused transactions.

Production runs uvloop (`serve_forever`), the rest of the suite mostly the
stdlib loop, and several of these broke only on uvloop. So every test here
runs its coroutine on both loops explicitly with `asyncio.Runner`, whatever
loop pytest-asyncio would pick. Everything goes over real loopback sockets
against the real server (in-process `Server`, or the `triaged serve`
subprocess for the signal tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from conftest import CaptureServer, SmtpTestClient, base_settings
from smtp_sink import SmtpSink
from triaged_proc import TriagedProcess

from proxy.server import Server

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"

Run = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a test coroutine on the loop this parameter names; fail on any
    exception the loop itself had to handle (a traceback in a callback)."""

    def runner(test: Callable[[], Awaitable[None]]) -> None:
        loop_errors: list[dict[str, Any]] = []

        def record(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            # The stdlib's start_server reports its own cancelled client
            # tasks (the capture server's, at its stop) through this handler.
            if not isinstance(context.get("exception"), asyncio.CancelledError):
                loop_errors.append(context)

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(record)
            await asyncio.wait_for(test(), 60)

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            r.run(main())
        assert loop_errors == [], loop_errors

    return runner


@contextlib.asynccontextmanager
async def triaged(capture: CaptureServer | None = None, **sections: Any) -> AsyncIterator[Server]:
    """A real Server on port 0 in the running loop, in front of `capture`."""
    own = capture is None
    cap = capture or CaptureServer()
    if own:
        await cap.start()
    sinks = sections.pop("sinks", ())
    srv = Server(base_settings(cap.url, **sections), sinks=sinks)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(drain_timeout_s=1.0)
        if own:
            await cap.stop()


async def client_for(srv: Server, ehlo: bool = True) -> SmtpTestClient:
    host, port = srv.addresses[0]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    if ehlo:
        assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


async def read_all(c: SmtpTestClient, wait_s: float = 10.0) -> bytes:
    """Everything the server still sends until it closes the connection."""
    out = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(wait_s):
            while chunk := await c.reader.read(65536):
                out += chunk
    return out


# -- finding 2: refused connections get a reply, not EOF and a traceback -----


def test_over_max_connections_gets_421(run: Run) -> None:
    async def test() -> None:
        async with triaged(server={"max_connections": 1}) as srv:
            first = await client_for(srv)
            host, port = srv.addresses[0]
            second = await SmtpTestClient.connect(host, port)
            assert await read_all(second) == b"421 4.7.0 Too many connections, try again later\r\n"
            await second.close()
            assert (await first.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
            await first.close()

    run(test)


def test_client_outside_allowed_clients_gets_554(run: Run) -> None:
    async def test() -> None:
        async with triaged(server={"allowed_clients": ["10.0.0.0/8"]}) as srv:
            host, port = srv.addresses[0]
            c = await SmtpTestClient.connect(host, port, preamble=b"EHLO early.test\r\n")
            assert await read_all(c) == b"554 5.7.1 Access denied\r\n"
            await c.close()

    run(test)


# -- finding 1: drain (in process: Server.stop) -------------------------------


def test_stop_with_idle_mid_command_and_open_transactions_drains(run: Run) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        srv = Server(base_settings(cap.url))
        await srv.start()
        idle = await client_for(srv)
        partial = await client_for(srv)
        partial.writer.write(b"MAIL FROM:<a@exa")  # half a command line
        busy = await client_for(srv)
        assert (await busy.cmd("MAIL FROM:<a@example.org>"))[0] == 250
        assert (await busy.cmd("RCPT TO:<b@example.net>"))[0] == 250
        stopping = asyncio.create_task(srv.stop(drain_timeout_s=10.0))
        assert await read_all(idle) == b"421 4.3.2 Service shutting down, try again later\r\n"
        assert await read_all(partial) == b"421 4.3.2 Service shutting down, try again later\r\n"
        # The open transaction finishes, then its session is closed with 421.
        assert (await busy.cmd("DATA"))[0] == 354
        assert (await busy.data(MESSAGE))[0] == 250
        assert await read_all(busy) == b"421 4.3.2 Service shutting down, try again later\r\n"
        await stopping
        assert len(cap.messages) == 1
        for c in (idle, partial, busy):
            await c.close()
        await cap.stop()

    run(test)


def test_stop_past_the_deadline_mid_data_never_reads_the_body_as_commands(run: Run) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        srv = Server(base_settings(cap.url))
        await srv.start()
        c = await client_for(srv)
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<b@example.net>")
        assert (await c.cmd("DATA"))[0] == 354
        c.writer.write(b"Subject: slow\r\n\r\nfirst half\r\n")
        await c.writer.drain()
        await srv.stop(drain_timeout_s=0.3)  # the client does not finish in time
        with contextlib.suppress(ConnectionError):
            c.writer.write(b"RSET\r\nMAIL FROM:<evil@example.org>\r\nNOOP\r\n.\r\n")
        assert await read_all(c) == b"421 4.3.2 Service shutting down, try again later\r\n"
        assert cap.messages == [] and "NOOP" not in cap.commands
        await c.close()
        await cap.stop()

    run(test)


# -- finding 1: SIGTERM on the real `triaged serve` (uvloop, as shipped) ------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(512).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert _reply(s).startswith(b"250 ")
    return s


def _reply(s: socket.socket) -> bytes:
    """One (possibly multi-line) reply; its last line."""
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return lines[-2] + b"\r\n"


def _rest(s: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionError):
        while chunk := s.recv(65536):
            out += chunk
    return out


@contextlib.contextmanager
def server_section(sink: SmtpSink, lines: str) -> Iterator[TriagedProcess]:
    """`triaged serve` with extra keys in its [server] table."""
    t = TriagedProcess(f"smtp://127.0.0.1:{sink.port}")
    t.config_path.write_text(t.config_path.read_text().replace("[server]\n", f"[server]\n{lines}\n", 1))
    try:
        yield t.start()
    finally:
        t.close()


SHUTDOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


def test_sigterm_drains_idle_mid_command_and_mid_data_clients() -> None:
    with SmtpSink() as sink, TriagedProcess(f"smtp://127.0.0.1:{sink.port}") as t:
        idle = _connect(t.port)
        partial = _connect(t.port)
        partial.sendall(b"RCPT TO:<b@exa")
        mid_data = _connect(t.port)
        for line in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"DATA"):
            mid_data.sendall(line + b"\r\n")
            assert _reply(mid_data)[:1] in (b"2", b"3")
        mid_data.sendall(b"Subject: drained\r\n\r\nline one\r\n")
        time.sleep(0.2)
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
        assert _rest(idle) == SHUTDOWN
        assert _rest(partial) == SHUTDOWN
        # Command-like body lines stay body lines; the message completes.
        mid_data.sendall(b"RSET\r\nQUIT\r\nline three\r\n.\r\n")
        # Exactly two replies: the next hop's 250, then 421 as the session closes.
        final, closing, end = _rest(mid_data).split(b"\r\n")
        assert final.startswith(b"250 2.0.0") and closing + b"\r\n" == SHUTDOWN and end == b"", final
        assert t.proc.wait(20) == 0, t.log_tail()
        [delivery] = sink.wait_for(1)
        assert delivery.data.endswith(b"line one\r\nRSET\r\nQUIT\r\nline three\r\n")
        log = t.log_tail(100_000)
        assert "Traceback" not in log and "Error" not in log, log
        for s in (idle, partial, mid_data):
            s.close()


def test_sigterm_past_drain_timeout_mid_data_gets_421_and_exit_0() -> None:
    with SmtpSink() as sink, server_section(sink, "drain_timeout_s = 0.5") as t:
        mid_data = _connect(t.port)
        for line in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"DATA"):
            mid_data.sendall(line + b"\r\n")
            assert _reply(mid_data)[:1] in (b"2", b"3")
        mid_data.sendall(b"Subject: never finished\r\n\r\n")
        time.sleep(0.2)
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(20) == 0, t.log_tail()
        with contextlib.suppress(ConnectionError):
            mid_data.sendall(b"RSET\r\nMAIL FROM:<evil@example.org>\r\n.\r\n")
        assert _rest(mid_data) == SHUTDOWN
        assert sink.deliveries == []
        log = t.log_tail(100_000)
        assert "Traceback" not in log, log
        mid_data.close()


