"""Client timeouts with the session's one lazily moved timer (proxy/smtp/session.py
`_reset_timeout`): the same deadlines aiosmtpd's timer per command gave."""

from __future__ import annotations

import asyncio
import time

from conftest import CaptureServer, SmtpTestClient, StartTriaged

MESSAGE = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n"


async def _client(srv: object) -> SmtpTestClient:
    host, port = srv.addresses[0]  # type: ignore[attr-defined]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


async def test_idle_timeout_after_a_message_is_the_idle_one(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """DATA moves the deadline to data_timeout_s (30 s here); once the
    message is done the shorter idle_timeout_s applies again at once."""
    srv = await start_triaged(server={"idle_timeout_s": 0.4, "data_timeout_s": 30.0})
    c = await _client(srv)
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    t0 = time.monotonic()
    assert await asyncio.wait_for(c.reader.read(), 20) == b""  # closed by us
    assert time.monotonic() - t0 < 10  # not the 30 s DATA deadline
    assert len(capture.messages) == 1
    await c.close()


async def test_a_talking_client_is_not_timed_out(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """Commands keep coming, each within idle_timeout_s of the last, for
    several times idle_timeout_s: the timer fires early and re-arms, never closes."""
    srv = await start_triaged(server={"idle_timeout_s": 0.4})
    c = await _client(srv)
    for _ in range(8):
        await asyncio.sleep(0.15)
        assert (await c.cmd("NOOP"))[0] == 250
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()


async def test_slow_data_past_the_idle_timeout_is_allowed(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """A body sent slower than idle_timeout_s but within data_timeout_s goes
    through; the timer then stands at the DATA deadline, and the idle
    deadline after the message, sooner, still closes the idle session."""
    srv = await start_triaged(server={"idle_timeout_s": 0.3, "data_timeout_s": 30.0})
    c = await _client(srv)
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    for line in (b"From: a@example.org\r\n", b"Subject: slow\r\n", b"\r\n", b"body\r\n"):
        c.writer.write(line)
        await asyncio.sleep(0.25)  # 1 s in all: past idle_timeout_s
    c.writer.write(b".\r\n")
    assert (await c.reply())[0] == 250
    assert len(capture.messages) == 1
    t0 = time.monotonic()
    assert await asyncio.wait_for(c.reader.read(), 40) == b""  # closed by us
    assert time.monotonic() - t0 < 10  # at idle_timeout_s, not the DATA deadline
    await c.close()


async def test_ehlo_reply_goes_out_in_one_write(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    """aiosmtpd pushes EHLO's lines one by one; the session gathers them into
    one write (one syscall and segment per EHLO, not seven)."""
    srv = await start_triaged()
    host, port = srv.addresses[0]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    [session] = list(srv.ctx.connections)
    writes: list[bytes] = []
    real = session.transport

    class CountingTransport:
        # uvloop's transport methods cannot be replaced: wrap the transport.
        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            real.write(data)  # type: ignore[union-attr]

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    session.transport = CountingTransport()  # type: ignore[assignment]
    code, text = await c.cmd("EHLO client.test")
    assert code == 250
    lines = text.splitlines()
    assert lines[-1] == "HELP" and "ENHANCEDSTATUSCODES" in lines and len(lines) >= 5
    assert len(writes) == 1 and writes[0].count(b"\r\n") == len(lines)
    # Other replies are still written as they come, one per command.
    assert (await c.cmd("NOOP"))[0] == 250
    assert len(writes) == 2
    assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE))[0] == 250
    await c.close()
