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
from conftest import CaptureServer, ListSink, SmtpTestClient, base_settings
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




# -- finding 5: SMTP smuggling and bare line endings --------------------------

SMUGGLED = b"MAIL FROM:<smuggler@evil.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nowned\r\n"
# End-of-data sequences a lenient next hop may accept (SMTP smuggling, 2023).
SMUGGLING = [b"\n.\r\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\r\n.\n"]


async def _send_raw_data(c: SmtpTestClient, body: bytes) -> tuple[int, str]:
    """A transaction whose DATA bytes are exactly `body`, then the end
    marker (no dot-stuffing: a lone dot after a bare CR or LF goes as is)."""
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    c.writer.write(body + (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n"))
    return await c.reply()


def test_smuggling_sequences_are_refused_by_default(run: Run) -> None:
    async def test() -> None:
        sink = ListSink()
        async with triaged(sinks=[sink]) as srv:
            c = await client_for(srv)
            for seq in SMUGGLING:
                code, text = await _send_raw_data(c, b"Subject: carrier\r\n\r\nhello" + seq + SMUGGLED)
                assert (code, text) == (550, "5.5.2 Bare <CR> or <LF> in message data, lines must end in <CR><LF>")
                # The session goes on; what followed the fake end was body, not commands.
                assert (await c.cmd("NOOP"))[0] == 250
            assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
            await c.close()
        assert [r.reply_code for r in sink.records] == [550] * len(SMUGGLING) + [250]
        assert {r.verdict for r in sink.records[:-1]} == {"reject"}

    run(test)


def test_smuggling_sequences_are_normalized_when_configured(run: Run) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, server={"bare_lf": "normalize"}) as srv:
            c = await client_for(srv)
            for seq in SMUGGLING:
                body = b"Subject: carrier\r\n\r\nhello" + seq + SMUGGLED
                code, _ = await _send_raw_data(c, body)
                assert code == 250
                got = cap.messages[-1].data
                # Every line ends in CRLF now; the lone dot is a body line the
                # next hop got dot-stuffed, so it ended nothing there.
                assert got.count(b"\n") == got.count(b"\r\n") and got.count(b"\r") == got.count(b"\r\n")
                assert got.endswith(b"hello\r\n.\r\n" + SMUGGLED), (seq, got[-200:])
            await c.close()
        assert {m.sender for m in cap.messages} == {"a@example.org"}
        assert len(cap.messages) == len(SMUGGLING)
        await cap.stop()

    run(test)


def test_bare_lf_message_body_is_kept_when_normalized(run: Run) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, server={"bare_lf": "normalize"}) as srv:
            c = await client_for(srv)
            raw = b"From: a@example.org\nSubject: bare\n\nline one\n..dotted\nlast\n"
            code, _ = await _send_raw_data(c, raw[:-1])
            assert code == 250
            assert cap.messages[0].data.endswith(b"\r\n\r\nline one\r\n.dotted\r\nlast\r\n")
            await c.close()
        await cap.stop()

    run(test)


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ('MAIL FROM:<"a\rb"@example.org>', "501 5.1.7"),
        ('MAIL FROM:<"a\x01b"@example.org>', "501 5.1.7"),
        ('MAIL FROM:<"a\x7fb"@example.org>', "501 5.1.7"),
        ('RCPT TO:<"a\rRSET"@example.net>', "501 5.1.3"),
        ("XFORWARD NAME=a\rb", "501 5.5.4"),
    ],
)
def test_control_characters_in_addresses_are_refused(run: Run, command: str, reply: str) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        async with triaged(cap) as srv:
            c = await client_for(srv)
            if command.startswith("RCPT"):
                assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            code, text = await c.cmd(command.encode())
            assert f"{code} {text}".startswith(reply), (code, text)
            await c.close()
        await cap.stop()
        assert not any("\r" in cmd for cmd in cap.commands)
        assert cap.commands.count("RCPT") == 0

    run(test)


def test_control_characters_never_reach_the_maildir_return_path(run: Run, tmp_path: Any) -> None:
    async def test() -> None:
        md = tmp_path / "Maildir"
        async with triaged(upstream={"url": f"maildir:{md}"}) as srv:
            c = await client_for(srv)
            code, _ = await c.cmd(b'MAIL FROM:<"x\rReturn-Path: <forged@evil.test>"@example.org>')
            assert code == 501
            assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
            await c.close()
        [path] = list((md / "new").iterdir())
        assert path.read_bytes().startswith(b"Return-Path: <a@example.org>\n")

    run(test)


# -- finding 6: a full pool answers at once; idle clients give their slot back --


def test_full_pool_answers_451_4_3_2_at_once(run: Run) -> None:
    async def test() -> None:
        from waiting import wait_until

        cap = CaptureServer()
        await cap.start()
        # connect_timeout_s is long: the old pool waited that long, then said 4.4.1.
        upstream = {"pool_size": 1, "connect_timeout_s": 60.0, "command_timeout_s": 1.0}
        async with triaged(cap, upstream=upstream) as srv:
            busy = await client_for(srv)
            assert (await busy.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            cap.stall_on = "RCPT"  # the one connection is busy with a command
            busy.writer.write(b"RCPT TO:<b@example.net>\r\n")
            await wait_until(lambda: "RCPT" in cap.commands)
            other = await client_for(srv)
            code, text = await other.cmd("MAIL FROM:<a@example.org>")
            assert (code, text) == (451, "4.3.2 Next hop connections busy, try again later")
            assert srv.metrics.upstream_errors.labels("pool_full")._value.get() == 1
            assert srv.metrics.upstream_errors.labels("connect")._value.get() == 0
            cap.stall_on = ""
            assert (await busy.reply())[0] == 451  # the stalled RCPT timed out
            assert (await other.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
            for c in (busy, other):
                await c.close()
        await cap.stop()

    run(test)


def test_idle_transactions_cannot_starve_a_full_pool(run: Run) -> None:
    async def test() -> None:
        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, upstream={"pool_size": 2, "hold_idle_s": 600.0}) as srv:
            holders = [await client_for(srv) for _ in range(4)]
            for i, h in enumerate(holders):  # twice pool_size idle transactions
                assert (await h.cmd(f"MAIL FROM:<holder{i}@example.org>"))[0] == 250
                assert (await h.cmd(f"RCPT TO:<r{i}@example.net>"))[0] == 250
            c = await client_for(srv)
            for _ in range(3):  # everyone else still gets through
                assert (await c.send_message("b@example.org", ["x@example.net"], MESSAGE))[0] == 250
            for h in holders:  # and the holders finish, replayed where needed
                assert (await h.cmd("DATA"))[0] == 354
                assert (await h.data(MESSAGE))[0] == 250
            for h in (*holders, c):
                await h.close()
            assert srv.metrics.upstream_errors.labels("pool_full")._value.get() == 0
            assert srv.metrics.upstream_leases_returned.labels("pool_full")._value.get() >= 2
        got = {m.sender: m.recipients for m in cap.messages}
        assert got == {"b@example.org": ["x@example.net"]} | {
            f"holder{i}@example.org": [f"r{i}@example.net"] for i in range(4)
        }
        assert len(cap.messages) == 7
        await cap.stop()

    run(test)


def test_idle_transactions_give_the_connection_back_and_resume(run: Run) -> None:
    async def test() -> None:
        from waiting import wait_until

        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, upstream={"pool_size": 1, "hold_idle_s": 0.2}) as srv:
            idle = await client_for(srv)
            assert (await idle.cmd("MAIL FROM:<idle@example.org> BODY=8BITMIME"))[0] == 250
            assert (await idle.cmd("RCPT TO:<one@example.net>"))[0] == 250
            await wait_until(lambda: srv.upstream.in_use == 0, what="the idle lease went back")
            assert "RSET" in cap.commands
            # Everyone else gets the one pooled connection meanwhile.
            busy = await client_for(srv)
            assert (await busy.send_message("b@example.org", ["x@example.net"], MESSAGE))[0] == 250
            # The idle client goes on: MAIL and the accepted RCPT are replayed.
            assert (await idle.cmd("RCPT TO:<two@example.net>"))[0] == 250
            await wait_until(lambda: srv.upstream.in_use == 0, what="idle again")
            assert (await idle.cmd("DATA"))[0] == 354
            assert (await idle.data(MESSAGE))[0] == 250
            for c in (idle, busy):
                await c.close()
        got = {m.sender: m for m in cap.messages}
        assert got["idle@example.org"].recipients == ["one@example.net", "two@example.net"]
        assert got["idle@example.org"].mail_params == ["BODY=8BITMIME"]
        assert got["b@example.org"].recipients == ["x@example.net"]
        await cap.stop()

    run(test)


def test_a_slow_body_gives_the_connection_back_and_is_relayed(run: Run) -> None:
    async def test() -> None:
        from waiting import wait_until

        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, upstream={"pool_size": 1, "hold_idle_s": 0.2}) as srv:
            c = await client_for(srv)
            assert (await c.cmd("MAIL FROM:<slow@example.org>"))[0] == 250
            assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
            c.writer.write(MESSAGE[:30])
            await wait_until(lambda: srv.upstream.in_use == 0, what="parked mid-body")
            assert srv.metrics.upstream_leases_returned.labels("idle")._value.get() == 1
            c.writer.write(MESSAGE[30:] + b".\r\n")
            assert (await c.reply())[0] == 250
            await c.close()
        [m] = cap.messages
        assert (m.sender, m.recipients) == ("slow@example.org", ["b@example.net"])
        assert m.data.endswith(MESSAGE)
        await cap.stop()

    run(test)


def test_a_replay_answered_differently_tempfails_the_transaction(run: Run) -> None:
    async def test() -> None:
        from waiting import wait_until

        cap = CaptureServer()
        await cap.start()
        async with triaged(cap, upstream={"hold_idle_s": 0.2}) as srv:
            c = await client_for(srv)
            assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            assert (await c.cmd("RCPT TO:<gone@example.net>"))[0] == 250
            await wait_until(lambda: srv.upstream.in_use == 0, what="parked")
            cap.refuse_rcpt["gone@example.net"] = "550 5.1.1 gone meanwhile"
            # The client saw 250 for gone@: dropping it silently would lose mail.
            code, text = await c.cmd("DATA")
            assert (code, text[:5]) == (451, "4.3.0")
            assert (await c.cmd("RSET"))[0] == 250
            assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
            await c.close()
        assert [m.recipients for m in cap.messages] == [["b@example.net"]]
        await cap.stop()

    run(test)


# -- finding 9: refusals write the transaction line; aiosmtpd's lines are JSON --


def test_size_and_memory_refusals_write_a_transaction_record(run: Run) -> None:
    async def test() -> None:
        sink = ListSink()
        async with triaged(sinks=[sink], server={"max_message_bytes": 2048}) as srv:
            c = await client_for(srv)
            code, _ = await c.send_message("a@example.org", ["b@example.net"], MESSAGE + b"x" * 4000 + b"\r\n")
            assert code == 552
            await c.close()
        async with triaged(sinks=[sink], server={"max_inflight_data_bytes": 1024}) as srv:
            c = await client_for(srv)
            code, _ = await c.send_message("a@example.org", ["b@example.net"], MESSAGE + b"y" * 3000 + b"\r\n")
            assert code == 452
            await c.close()
        assert [(r.reply_code, r.verdict, r.category) for r in sink.records] == [
            (552, "reject", None),
            (452, "tempfail", None),
        ]
        assert sink.records[0].size_bytes > 4000 and sink.records[0].recipients == ("b@example.net",)

    run(test)


def test_serve_logs_only_json_lines_and_no_client_bytes() -> None:
    import json

    with SmtpSink() as sink, TriagedProcess(f"smtp://127.0.0.1:{sink.port}") as t:
        s = _connect(t.port)
        for line in (b"XYZZY secret-client-bytes", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>"):
            s.sendall(line + b"\r\n")
            _reply(s)
        s.sendall(b"DATA\r\n")
        _reply(s)
        s.sendall(b"Subject: big\r\n\r\n" + b"z" * 60_000_000 + b"\r\n.\r\n")
        assert _reply(s).startswith(b"552 ")
        s.close()
        assert t.stop() == 0
        log = t.log_path.read_text()
    assert "XYZZY" not in log and "secret-client-bytes" not in log, log
    events = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert [e for e in events if e["event"] == "transaction"][-1]["reply"] == 552
