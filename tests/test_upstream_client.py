"""The next-hop client's reply deadlines (proxy/smtp/client.py `_watch`): one
lazily moved timer per connection must give the same deadlines as a timeout
per command. Against a scripted next hop on a real loopback socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from proxy.smtp.client import SmtpClient, UpstreamError


class ScriptedHop:
    """Answers the greeting, EHLO, NOOP and DATA; stalls on any command in `stall`."""

    def __init__(self) -> None:
        self.stall: set[str] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hop ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line.split()[0].upper().decode() if line.strip() else ""
                if verb in self.stall:
                    await reader.read()  # never answers; reads until the client goes
                    return
                if verb == "EHLO":
                    writer.write(b"250-hop\r\n250 PIPELINING\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go on\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def hop() -> AsyncIterator[ScriptedHop]:
    h = ScriptedHop()
    await h.start()
    yield h
    await h.close()


async def _connect(hop: ScriptedHop, command_s: float, data_s: float) -> SmtpClient:
    return await SmtpClient.connect(
        "127.0.0.1", hop.port, helo_name="t", connect_timeout_s=5.0,
        command_timeout_s=command_s, data_timeout_s=data_s,
    )


async def test_stalled_reply_times_out(hop: ScriptedHop) -> None:
    hop.stall.add("RSET")
    client = await _connect(hop, 0.3, 30.0)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(client.command("RSET"), 20)
    assert info.value.timeout
    assert time.monotonic() - t0 >= 0.25  # not before its deadline
    assert not client.usable


async def test_shorter_deadline_after_the_longer_data_deadline(hop: ScriptedHop) -> None:
    """The timer armed for DATA's 30 s must not hold a 0.3 s command past 0.3 s."""
    hop.stall.add("RSET")
    client = await _connect(hop, 0.3, 30.0)
    assert (await client.data([b"Subject: x\r\n\r\nbody\r\n"])).code == 250
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as info:
        await asyncio.wait_for(client.command("RSET"), 10)
    assert info.value.timeout
    assert time.monotonic() - t0 < 5  # the 30 s timer was not the one that fired


async def test_idle_connection_outlives_its_deadline(hop: ScriptedHop) -> None:
    """A deadline passing while no reply is awaited (the pool holds the
    connection) must not close it; the next command gets its own deadline."""
    client = await _connect(hop, 0.2, 0.2)
    assert (await client.command("NOOP")).ok
    await asyncio.sleep(0.6)  # three deadlines pass with the connection idle
    assert client.usable
    assert (await client.command("NOOP")).ok
    assert (await client.data([b"Subject: y\r\n\r\nbody\r\n"])).ok
    await asyncio.sleep(0.3)
    assert (await client.command("NOOP")).ok
    await client.quit()


async def test_replies_within_the_deadline_are_not_cut(hop: ScriptedHop) -> None:
    """Commands spread over more than one deadline, each answered in time:
    the timer re-arms for the current command, never fires on it."""
    client = await _connect(hop, 0.25, 0.25)
    for _ in range(8):
        assert (await client.command("NOOP")).ok
        await asyncio.sleep(0.1)
    assert client.usable
    await client.quit()
