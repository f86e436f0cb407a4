"""The next-hop client's reply deadlines (proxy/smtp/client.py `_watch`): one
lazily moved timer per connection must give the same deadlines as a timeout
per command. Against a scripted next hop on a real loopback socket."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

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


# -- the reply parser (_HopProtocol.data_received) ---------------------------
#
# A raw next hop whose every byte, and where its segments break, is the
# test's: a script per test drives one connection. Chunks are written one at a
# time, each drained and followed by a short sleep, so that each arrives in its
# own data_received call.

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_GAP_S = 0.02  # between chunks: each lands in its own segment


class RawHop:
    """A next hop on 127.0.0.1 that runs `script` on each connection.

    What the script raises (a failed check on what the client sent) is kept
    in `errors`; the fixture fails the test with it at teardown."""

    def __init__(self, script: Script, *, rcvbuf: int = 0) -> None:
        self.script = script
        self.rcvbuf = rcvbuf
        self.errors: list[BaseException] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:  # inherited by accepted sockets: a small window, a slow reader
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


StartHop = Callable[..., Awaitable[RawHop]]


@pytest.fixture
async def raw_hop() -> AsyncIterator[StartHop]:
    hops: list[RawHop] = []

    async def start(script: Script, *, rcvbuf: int = 0) -> RawHop:
        h = RawHop(script, rcvbuf=rcvbuf)
        await h.start()
        hops.append(h)
        return h

    yield start
    for h in hops:
        await h.close()
    for h in hops:
        if h.errors:
            raise h.errors[0]


async def _send(writer: asyncio.StreamWriter, *chunks: bytes) -> None:
    """Each chunk in its own write, drained, then a pause."""
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(_GAP_S)


async def _expect(reader: asyncio.StreamReader, verb: str) -> str:
    """The client's next command line; it must start with `verb` (any case)."""
    line = (await reader.readuntil(b"\r\n")).decode("utf-8", "surrogateescape")[:-2]
    assert line.upper().startswith(verb.upper()), f"expected {verb}, got {line!r}"
    return line


async def _converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *steps: tuple[str, bytes]
) -> None:
    """For each (verb, answer): the client's next command must start with
    `verb`; then `answer` goes back."""
    for verb, answer in steps:
        await _expect(reader, verb)
        await _send(writer, answer)


async def _greet(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ehlo: bytes = b"250-hop\r\n250 PIPELINING\r\n",
) -> None:
    writer.write(b"220 hop ESMTP\r\n")
    await _expect(reader, "EHLO")
    writer.write(ehlo)
    await writer.drain()


async def _until_client_goes(reader: asyncio.StreamReader) -> None:
    """Never answer again; read until the client closes."""
    while await reader.read(1 << 16):
        pass


async def _raw_connect(hop: RawHop, *, command_s: float = 5.0, data_s: float = 10.0) -> SmtpClient:
    return await asyncio.wait_for(
        SmtpClient.connect(
            "127.0.0.1", hop.port, helo_name="t", connect_timeout_s=5.0,
            command_timeout_s=command_s, data_timeout_s=data_s,
        ),
        5,
    )


async def test_ehlo_reply_split_mid_line(raw_hop: StartHop) -> None:
    """Lines, codes and even a CRLF cut across segments make the same reply."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send(writer, b"22", b"0 hop ESMTP\r", b"\n")
        await _expect(reader, "EHLO t")
        await _send(
            writer,
            b"250-hop\r\n250-PIP",
            b"ELINING\r",
            b"\n250-SIZE 1000",
            b"00\r\n25",
            b"0 8BIT",
            b"MIME\r\n",
        )
        await _expect(reader, "NOOP")
        await _send(writer, b"250 2.0.", b"0 Ok\r\n")
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    assert client.extensions == {"PIPELINING": "", "SIZE": "100000", "8BITMIME": ""}
    reply = await asyncio.wait_for(client.command("NOOP"), 2)
    assert (reply.code, reply.message) == (250, "2.0.0 Ok")
    assert client.usable
    client.close()


async def test_bare_lf_lines_and_verbatim_text(raw_hop: StartHop) -> None:
    """Lines ending in LF alone still parse; the text after the code and its
    separator comes back exactly as sent, multi-line joined with "\\n"."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, ehlo=b"250-hop greets t\n250-PIPELINING\n250 8BITMIME\n")
        await _converse(
            reader, writer,
            ("NOOP", b"250 2.0.0 Ok\n"),
            ("MAIL FROM:<a@example.org>", b"250-first line\n250-  spaced  out \n250 last: 4.2.0 \xc3\xa9t\xc3\xa9\n"),
            ("RCPT TO:<b@example.org>", b"550-5.1.1 mixed\r\n550 5.1.1 endings\n"),
            ("RSET", b"250\n"),
        )
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    assert client.extensions == {"PIPELINING": "", "8BITMIME": ""}
    reply = await asyncio.wait_for(client.command("NOOP"), 2)
    assert (reply.code, reply.message) == (250, "2.0.0 Ok")
    reply = await asyncio.wait_for(client.mail("a@example.org", []), 2)
    assert (reply.code, reply.message) == (250, "first line\n  spaced  out \nlast: 4.2.0 été")
    reply = await asyncio.wait_for(client.rcpt("b@example.org", []), 2)
    assert (reply.code, reply.message) == (550, "5.1.1 mixed\n5.1.1 endings")
    assert not reply.ok
    reply = await asyncio.wait_for(client.command("RSET"), 2)
    assert (reply.code, reply.message) == (250, "")
    assert client.usable
    client.close()


@pytest.mark.parametrize(
    "answer",
    [b"hello\r\n", b"250-fine so far\r\nhello\r\n", b"\r\n", b"25\r\n", b"2x0 Ok\r\n"],
    ids=["no-code", "bad-continuation", "empty", "short", "non-digit"],
)
async def test_malformed_reply_line(raw_hop: StartHop, answer: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "MAIL")
        await _send(writer, answer)
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    with pytest.raises(UpstreamError, match="malformed reply") as info:
        await asyncio.wait_for(client.mail("a@example.org", []), 2)
    assert not info.value.timeout
    assert not client.usable
    with pytest.raises(UpstreamError):  # and it stays broken
        await asyncio.wait_for(client.command("NOOP"), 2)


async def test_reply_line_over_64k_fails(raw_hop: StartHop) -> None:
    """More than 64 KiB with no line end: an error at once, not a wait for
    the deadline nor an unbounded buffer."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "NOOP")
        await _send(writer, b"250-", *[b"x" * 8192] * 9)  # 72 KiB + 4, no LF
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop, command_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError, match="too long") as info:
        await asyncio.wait_for(client.command("NOOP"), 3)
    assert not info.value.timeout
    assert time.monotonic() - t0 < 2
    assert not client.usable


async def test_long_reply_line_under_the_limit_is_kept(raw_hop: StartHop) -> None:
    """A 60 KiB line that arrives in many segments is one line, kept whole."""
    text = bytes(ord("a") + i % 26 for i in range(60 * 1024))

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "NOOP")
        line = b"250-" + text + b"\r\n250 end\r\n"
        await _send(writer, *[line[at : at + 8192] for at in range(0, len(line), 8192)])
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    reply = await asyncio.wait_for(client.command("NOOP"), 3)
    assert reply.code == 250
    assert reply.message == text.decode() + "\nend"
    assert client.usable
    client.close()


@pytest.mark.parametrize("sent", [b"250-partial\r\n", b"250-partial", b""], ids=["line", "part-line", "nothing"])
@pytest.mark.parametrize("how", ["close", "abort"])
async def test_hop_closes_mid_reply(raw_hop: StartHop, sent: bytes, how: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "NOOP")
        if sent:
            await _send(writer, sent)
        if how == "abort":
            writer.transport.abort()
        else:
            writer.close()

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    with pytest.raises(UpstreamError, match="connection lost") as info:
        await asyncio.wait_for(client.command("NOOP"), 2)
    assert not info.value.timeout
    assert not client.usable


async def test_unsolicited_reply_goes_to_the_next_command(raw_hop: StartHop) -> None:
    """A reply that comes while no command waits is kept, in order: the next
    command gets it, and the one after gets the next command's reply."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await asyncio.sleep(_GAP_S)
        await _send(writer, b"421-4.3.2 going\r\n", b"421 4.3.2 away\r\n", b"421 4.3.2 again\r\n")
        await _converse(
            reader, writer,
            ("NOOP", b"250 2.0.0 noop ok\r\n"),
            ("RSET", b"250 2.0.0 rset ok\r\n"),
            ("NOOP", b"250 2.0.0 second noop ok\r\n"),
        )
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    await asyncio.sleep(0.2)  # both 421s are here before the command goes out
    reply = await asyncio.wait_for(client.command("NOOP"), 2)
    assert (reply.code, reply.message) == (421, "4.3.2 going\n4.3.2 away")
    reply = await asyncio.wait_for(client.command("RSET"), 2)
    assert (reply.code, reply.message) == (421, "4.3.2 again")
    reply = await asyncio.wait_for(client.command("NOOP"), 2)
    assert (reply.code, reply.message) == (250, "2.0.0 noop ok")
    client.close()


async def test_cancelled_reply_read_makes_the_client_unusable(raw_hop: StartHop) -> None:
    """The reply to a command whose read was cancelled would be the next
    command's: the connection must not be used again."""
    noop_seen = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "NOOP")
        noop_seen.set()
        await asyncio.sleep(0.2)  # late: the read was cancelled before this
        writer.write(b"250 2.0.0 late noop\r\n")
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop, command_s=5.0)
    task = asyncio.create_task(client.command("NOOP"))
    await asyncio.wait_for(noop_seen.wait(), 2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not client.usable
    assert not await client.noop()  # not the late 250
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(client.command("RSET"), 2)


def _stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2 on the whole message, plus the end of data line."""
    out = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def _big_message(ends_with_crlf: bool) -> list[bytes]:
    """About 6 MiB in pieces: more than the kernel's socket buffers take
    (tcp_wmem's 4 MiB cap), so the transport fills up and waits on the slow
    hop (pause_writing / drain). Dot lines every 256 KiB, and piece breaks
    inside a CRLF, between a CRLF and its ".", and before a leading "."."""
    line = b"a line of body text that goes on for a bit, then ends\r\n"
    dots = b".\r\n..\r\n.leading dot\r\nnot a dot .\r\n...three\r\n"
    block = (line * (256 * 1024 // len(line)) + dots) * 24
    pieces = [
        b".starts with a dot\r\nSubject: big\r",
        b"\n.X-After-Split-CRLF: 1\r\n",
        b"\r\n",
        b".after a piece break\r\n" + block[: len(block) // 2],
        memoryview(block)[len(block) // 2 :].tobytes() + b"..tail\r",
        b"\n.",
    ]
    if ends_with_crlf:
        pieces.append(b"last line\r\n")
    else:
        pieces.append(b"no line end at the end")
    return pieces


@pytest.mark.parametrize("ends_with_crlf", [True, False], ids=["crlf-end", "no-crlf-end"])
async def test_large_data_to_a_slow_reader(raw_hop: StartHop, ends_with_crlf: bool) -> None:
    """A message far over the one-write size, to a next hop that reads slowly
    (a small receive window, a pause between reads): every byte gets there,
    stuffed as RFC 5321 says, and the final reply is the hop's."""
    pieces = _big_message(ends_with_crlf)
    message = b"".join(pieces)
    assert len(message) > 6 * (1 << 20)
    expected = _stuff(message)
    got: list[bytes] = []
    reads = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal reads
        await _greet(reader, writer)
        await _expect(reader, "DATA")
        await _send(writer, b"354 go on\r\n")
        buf = bytearray()
        while not buf.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(1 << 16)
            assert chunk, "the client closed in the middle of the message"
            buf += chunk
            reads += 1
            await asyncio.sleep(0.002)
        got.append(bytes(buf))
        writer.write(b"250 2.0.0 Ok: queued as BIG\r\n")
        await _expect(reader, "NOOP")
        writer.write(b"250 2.0.0 Ok\r\n")
        await _until_client_goes(reader)

    hop = await raw_hop(script, rcvbuf=1 << 16)
    client = await _raw_connect(hop, data_s=10.0)
    reply = await asyncio.wait_for(client.data(pieces), 5)
    assert (reply.code, reply.message) == (250, "2.0.0 Ok: queued as BIG")
    assert len(got) == 1
    assert len(got[0]) == len(expected)
    assert got[0] == expected
    # and the hop, un-stuffing, has the message itself
    unstuffed = (b"\r\n" + got[0][: -len(b".\r\n")]).replace(b"\r\n..", b"\r\n.")[2:]
    assert unstuffed == (message if ends_with_crlf else message + b"\r\n")
    assert reads > 10  # it did come slowly, in many reads
    assert client.transactions == 1
    assert (await asyncio.wait_for(client.command("NOOP"), 2)).code == 250
    assert client.usable
    client.close()


async def test_small_data_is_stuffed(raw_hop: StartHop) -> None:
    """The one-write path (up to 64 KiB) stuffs the same way."""
    pieces = [b".first\r\nSubject: s\r\n\r\n", b"..two\r\n.\r\nend"]
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer)
        await _expect(reader, "DATA")
        await _send(writer, b"354 go on\r\n")
        got.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 Ok: small\r\n")
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    reply = await asyncio.wait_for(client.data(pieces), 2)
    assert (reply.code, reply.message) == (250, "2.0.0 Ok: small")
    assert got == [b"..first\r\nSubject: s\r\n\r\n...two\r\n..\r\nend\r\n.\r\n"]
    client.close()


_XFORWARD_EHLO = b"250-hop\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR PORT\r\n"


@pytest.mark.parametrize("xforward_code", [250, 550])
async def test_xforward_is_pipelined_with_mail(raw_hop: StartHop, xforward_code: int) -> None:
    """With PIPELINING, XFORWARD and MAIL leave in one write: this hop reads
    both before it answers either (a client waiting for XFORWARD's reply first
    would wait forever). The reply handed back is MAIL's, whatever XFORWARD got;
    attributes the hop did not offer (PROTO) are not sent."""
    seen: list[str] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, ehlo=_XFORWARD_EHLO)
        seen.append(await _expect(reader, "XFORWARD"))
        seen.append(await _expect(reader, "MAIL"))
        await _send(writer, b"%d 2.0.0 xforward said\r\n" % xforward_code, b"250 2.1.0 Sender ok\r\n")
        await _converse(reader, writer, ("RCPT", b"250 2.1.5 Recipient ok\r\n"))
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    attrs = {"ADDR": "192.0.2.7", "PORT": "4242", "PROTO": "ESMTP"}
    reply = await asyncio.wait_for(client.mail("a@example.org", ["BODY=8BITMIME"], attrs), 2)
    assert (reply.code, reply.message) == (250, "2.1.0 Sender ok")
    assert seen == ["XFORWARD ADDR=192.0.2.7 PORT=4242", "MAIL FROM:<a@example.org> BODY=8BITMIME"]
    # In step afterwards: the next command gets its own reply.
    reply = await asyncio.wait_for(client.rcpt("b@example.org", []), 2)
    assert (reply.code, reply.message) == (250, "2.1.5 Recipient ok")
    client.close()


async def test_xforward_waits_for_its_reply_without_pipelining(raw_hop: StartHop) -> None:
    """A hop without PIPELINING gets one command at a time: nothing after an
    XFORWARD line until it is answered. Long attributes take several lines."""
    seen: list[str] = []
    name = "mx." + "n" * 390 + ".example"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _greet(reader, writer, ehlo=b"250-hop\r\n250 XFORWARD NAME ADDR\r\n")
        for verb in ("XFORWARD", "XFORWARD", "MAIL"):
            seen.append(await _expect(reader, verb))
            with pytest.raises(TimeoutError):  # nothing more before our answer
                await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.1)
            await _send(writer, b"250 2.0.0 Ok\r\n")
        await _until_client_goes(reader)

    hop = await raw_hop(script)
    client = await _raw_connect(hop)
    reply = await asyncio.wait_for(client.mail("a@example.org", [], {"NAME": name, "ADDR": "192.0.2.7"}), 5)
    assert reply.ok
    assert seen == [f"XFORWARD NAME={name}", "XFORWARD ADDR=192.0.2.7", "MAIL FROM:<a@example.org>"]
    client.close()
