"""The client side of the SMTP session on its own buffer (proxy/smtp/linebuffer.py
and TriageSMTP's `_command_loop` / `_read_body`), over real sockets on
127.0.0.1 and both event loops (conftest.py): commands and bodies that arrive a
byte at a time, pipelined, or split at the DATA end marker and across the
1 MiB body chunks; PROXY headers in pieces and at their largest; over-long
command lines; a client that never reads its replies (the buffers stay
bounded); a client that leaves mid-line."""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import struct
import time
import weakref
from typing import cast

import pytest
from conftest import CaptureServer, ListSink, SmtpTestClient, StartTriaged
from waiting import wait_until

from proxy.proxyproto import encode_v1, encode_v2
from proxy.server import Server
from proxy.settings import ListenerSettings
from proxy.smtp.session import TriageSMTP

MIB = 1 << 20
END = b"\r\n.\r\n"
MESSAGE = (
    b"From: a@example.org\r\n"
    b"To: b@example.net\r\n"
    b"Subject: buffer\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b"last line\r\n"
)
QUEUED = (250, "2.0.0 Ok: queued as CAPTURED")
TOO_LONG = (500, "5.5.2 Command line too long")
NOOP_OK = (250, "2.0.0 OK")
BYE = (221, "2.0.0 Bye")


def wire(message: bytes) -> bytes:
    """A message as the client sends it after 354: dot-stuffed, then the end marker."""
    stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    assert stuffed.endswith(b"\r\n")
    return stuffed + b".\r\n"


def assert_relayed(got: bytes, message: bytes) -> None:
    """What the next hop got is the message, byte for byte, under our stamp
    (whole X-Triage-* header lines in front, nothing else added)."""
    assert got.endswith(message), (len(got), len(message), got[:200])
    stamp = got[: len(got) - len(message)]
    assert stamp.endswith(b"\r\n"), stamp
    lines = stamp.split(b"\r\n")[:-1]
    assert lines and all(line.startswith(b"X-Triage-") for line in lines), stamp


async def connect(srv: Server) -> SmtpTestClient:
    host, port = srv.addresses[0]
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    return c


async def start_data(c: SmtpTestClient) -> None:
    """MAIL, RCPT and DATA, each accepted: the body comes next."""
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354


def only_session(srv: Server) -> TriageSMTP:
    assert srv.ctx is not None
    [session] = list(srv.ctx.connections)
    return session


async def no_reply_within(c: SmtpTestClient, seconds: float) -> None:
    """Nothing from triaged for `seconds` (readuntil consumes nothing when cancelled)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.reader.readuntil(b"\r\n"), seconds)


async def send_pieces(c: SmtpTestClient, *pieces: bytes, gap_s: float = 0.005) -> None:
    """Each piece in its own write, drained, then a pause: its own segment
    and, with triaged keeping up, its own data_received."""
    for piece in pieces:
        c.writer.write(piece)
        await c.writer.drain()
        await asyncio.sleep(gap_s)


async def trickle(c: SmtpTestClient, data: bytes) -> None:
    await send_pieces(c, *(data[i : i + 1] for i in range(len(data))), gap_s=0.001)


async def read_to_eof(c: SmtpTestClient) -> bytes:
    return await asyncio.wait_for(c.reader.read(), 10)


# -- bytes one at a time ------------------------------------------------------


async def test_a_whole_session_one_byte_at_a_time(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged()
    c = await connect(srv)
    steps: list[tuple[bytes, tuple[int, str] | int]] = [
        (b"HELO client.test\r\n", 250),
        (b"MAIL FROM:<a@example.org>\r\n", (250, "2.1.0 Ok")),
        (b"RCPT TO:<b@example.net>\r\n", (250, "2.1.5 Ok")),
        (b"DATA\r\n", (354, "End data with <CR><LF>.<CR><LF>")),
        (wire(MESSAGE), QUEUED),
        (b"QUIT\r\n", BYE),
    ]
    for data, expected in steps:
        await trickle(c, data)
        code, text = await c.reply()
        assert (code if isinstance(expected, int) else (code, text)) == expected, data
    assert await read_to_eof(c) == b""
    [got] = capture.messages
    assert got.sender == "a@example.org" and got.recipients == ["b@example.net"]
    assert_relayed(got.data, MESSAGE)
    await c.close()


# -- pipelining ---------------------------------------------------------------


async def test_pipelined_commands_and_a_quit_behind_the_body(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """RFC 2920's shape: EHLO to DATA in one write; then the body with QUIT
    right behind its end marker, in one write."""
    srv = await start_triaged()
    c = await connect(srv)
    c.writer.write(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    code, ehlo = await c.reply()
    assert code == 250 and ehlo.splitlines()[-1] == "HELP"
    assert await c.reply() == (250, "2.1.0 Ok")
    assert await c.reply() == (250, "2.1.5 Ok")
    assert (await c.reply())[0] == 354
    c.writer.write(wire(MESSAGE) + b"QUIT\r\n")
    assert await c.reply() == QUEUED
    assert await c.reply() == BYE
    assert await read_to_eof(c) == b""
    [got] = capture.messages
    assert_relayed(got.data, MESSAGE)
    assert capture.commands.count("DATA") == 1
    await c.close()


async def test_a_whole_session_in_one_write(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    """Two transactions, their bodies, NOOP and QUIT in a single write: body
    lines that look like commands stay body, and the bytes after each end
    marker are read as commands, in order."""
    srv = await start_triaged()
    c = await connect(srv)
    second = b"Subject: two\r\n\r\nRSET\r\nQUIT\r\nMAIL FROM:<evil@example.org>\r\n.\r\n"
    c.writer.write(
        b"EHLO client.test\r\n"
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n" + wire(MESSAGE)
        + b"MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n" + wire(second)
        + b"NOOP\r\nQUIT\r\n"
    )
    replies = [await c.reply() for _ in range(11)]
    assert [code for code, _ in replies] == [250, 250, 250, 354, 250, 250, 250, 354, 250, 250, 221]
    assert replies[4] == replies[8] == QUEUED
    assert replies[9:] == [NOOP_OK, BYE]
    assert await read_to_eof(c) == b""
    first, two = capture.messages
    assert (first.sender, two.sender) == ("a@example.org", "c@example.org")
    assert_relayed(first.data, MESSAGE)
    assert_relayed(two.data, second)
    assert "RSET" not in capture.commands and capture.commands.count("MAIL") == 2
    await c.close()


# -- the DATA end marker and the 1 MiB body chunks ----------------------------


async def test_end_marker_split_at_every_position(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    """The body's last bytes "\\r\\n.\\r\\n" cut in two writes at each of their
    5 positions: no reply until the marker is whole, then the message. And
    a dot line ("\\r\\n..\\r\\n" on the wire, a marker look-alike) cut at each
    of its positions stays in the body."""
    srv = await start_triaged()
    c = await connect(srv)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    sent: list[bytes] = []
    for k in range(5):
        message = MESSAGE.replace(b"Subject: buffer", b"Subject: end cut %d" % k)
        data = wire(message)
        assert data.endswith(END)
        cut = len(data) - len(END) + k
        await start_data(c)
        await send_pieces(c, data[:cut])
        await no_reply_within(c, 0.05)
        c.writer.write(data[cut:])
        assert await c.reply() == QUEUED, k
        sent.append(message)
    dotted = b"Subject: dot line\r\n\r\nbefore\r\n.\r\nafter\r\n"
    data = wire(dotted)
    at = data.index(b"\r\n..\r\n")
    for k in range(1, 6):
        await start_data(c)
        await send_pieces(c, data[: at + k])
        await no_reply_within(c, 0.02)
        c.writer.write(data[at + k :])
        assert await c.reply() == QUEUED, k
        sent.append(dotted)
    assert len(capture.messages) == len(sent)
    for got, message in zip(capture.messages, sent, strict=True):
        assert_relayed(got.data, message)
    assert srv.ctx is not None and srv.ctx.inflight_bytes == 0
    await c.close()


def big_message() -> tuple[bytes, bytes]:
    """(message, its wire form): about 6 MiB of lines from 1,001 to 70,000
    bytes, dot lines everywhere, and at each 1 MiB chunk boundary of the
    stream triaged reads ("\\r\\n" it puts in front + the wire form) a
    dot-stuffed line cut at another position; the end marker itself lies
    across the sixth boundary."""
    rng = random.Random(20261202)
    dot_lines = [b".", b"..", b".x", b"...", b". ", b".\t."]
    out = bytearray(b"Subject: big\r\nX-Long: " + b"h" * 3000 + b"\r\n\r\n")
    wire_len = len(out)  # no dots so far: wire and message agree in length

    def fill_to(target: int) -> None:
        # Lines of 1,001+ bytes (and some of 70,000) and dot lines, until the
        # stream offset 2 + wire_len is exactly `target`.
        nonlocal wire_len
        while True:
            room = target - (2 + wire_len)
            if room < 200_000:
                break
            if rng.random() < 0.3:
                line = rng.choice(dot_lines)
                out.extend(line + b"\r\n")
                wire_len += len(line) + 3  # + the stuffed dot
            else:
                n = rng.choice([1001, 1002, 1500, 4096, 9999, 1001, 1002, 70_000])
                out.extend(bytes([rng.randrange(97, 123)]) * n + b"\r\n")
                wire_len += n + 2
        room = target - (2 + wire_len)
        half = room // 2
        for n in (half - 2, room - half - 2):
            out.extend(b"L" * n + b"\r\n")
            wire_len += n + 2

    # At boundary n the stuffed line "\r\n..\r\n" begins d bytes before it.
    for n, d in enumerate([1, 2, 3, 4, 5], start=1):
        fill_to(n * MIB - d + 2)  # the CRLF ending the filler is its first 2 bytes
        out.extend(b".\r\n")
        wire_len += 4
    fill_to(6 * MIB - 3 + 2)  # the end marker "\r\n.\r\n" from 3 bytes before it
    message = bytes(out)
    data = wire(message)
    assert 2 + len(data) == 6 * MIB + 2
    stream = b"\r\n" + data
    for n, d in enumerate([1, 2, 3, 4, 5], start=1):
        assert stream[n * MIB - d : n * MIB - d + 6] == b"\r\n..\r\n", n
    assert stream[6 * MIB - 3 :] == END
    return message, data


async def test_a_body_of_several_chunks_relays_byte_exact(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    message, data = big_message()
    assert message.count(b"\r\n.") > 100 and max(map(len, message.split(b"\r\n"))) > 1000
    srv = await start_triaged()
    c = await connect(srv)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await start_data(c)
    # In writes of an odd size, with a pipelined NOOP right behind the end.
    await send_pieces(c, *(data[i : i + 700_001] for i in range(0, len(data), 700_001)), gap_s=0)
    c.writer.write(b"NOOP\r\n")
    assert await c.reply() == QUEUED
    assert await c.reply() == NOOP_OK
    [got] = capture.messages
    assert_relayed(got.data, message)
    assert srv.ctx is not None and srv.ctx.inflight_bytes == 0
    await c.close()


async def test_a_large_body_is_handed_on_in_chunks_not_held_whole(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """While a body streams in, the session takes it off its buffer in 1 MiB
    chunks before the end marker arrives: the buffer never holds much more
    than its DATA high-water mark (2 MiB), however large the message."""
    message, data = big_message()
    srv = await start_triaged()
    c = await connect(srv)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await start_data(c)
    session = only_session(srv)
    most = 0
    for i in range(0, len(data), 64 * 1024):
        c.writer.write(data[i : i + 64 * 1024])
        await c.writer.drain()
        for _ in range(3):
            await asyncio.sleep(0)
        most = max(most, len(session._lines._buf))
    assert len(data) > 5 * MIB and most <= 2 * MIB + 256 * 1024, most
    assert await c.reply() == QUEUED
    [got] = capture.messages
    assert_relayed(got.data, message)
    await c.close()


# -- the PROXY header ---------------------------------------------------------


async def test_proxy_headers_a_byte_at_a_time_and_larger_than_the_high_water(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """PROXY v1 and v2 a byte at a time (no greeting until the header is
    whole), with EHLO pipelined behind its last byte; and a v2 header of the
    largest size (65,551 bytes, a TLV area filling its 16-bit length: more
    than the 64 KiB the buffer holds between commands), in one write with
    the whole session behind it."""
    sink = ListSink()
    listener = ListenerSettings(address="127.0.0.1:0", proxy_protocol=True)
    srv = await start_triaged(sinks=[sink], server={"listeners": [listener]})
    host, port = srv.addresses[0]
    v1 = encode_v1(("127.10.0.1", 40000), ("127.0.0.1", 25))
    v2 = encode_v2(("127.20.0.2", 40001), ("127.0.0.1", 25))
    for header in (v1, v2):
        c = await SmtpTestClient.connect(host, port)
        await trickle(c, header[:-1])
        await no_reply_within(c, 0.05)
        c.writer.write(header[-1:] + b"EHLO proxied.test\r\n")
        assert (await c.reply())[0] == 220
        assert (await c.reply())[0] == 250
        assert await c.send_message("a@example.org", ["b@example.net"], MESSAGE) == QUEUED
        await c.close()
    tlvs = b"\x04" + struct.pack("!H", 65535 - 12 - 3) + b"n" * (65535 - 12 - 3)  # PP2_TYPE_NOOP
    big = v2[:14] + struct.pack("!H", 65535) + v2[16:] + tlvs
    assert len(big) == 16 + 65535
    c = await SmtpTestClient.connect(host, port)
    c.writer.write(
        big + b"EHLO proxied.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        + wire(MESSAGE) + b"QUIT\r\n"
    )
    codes = [(await c.reply())[0] for _ in range(5)]
    assert codes == [220, 250, 250, 250, 354]
    assert await c.reply() == QUEUED
    assert await c.reply() == BYE
    assert await read_to_eof(c) == b""
    await c.close()
    assert [r.client_address for r in sink.records] == ["127.10.0.1", "127.20.0.2", "127.20.0.2"]
    assert len(capture.messages) == 3
    for got in capture.messages:
        assert_relayed(got.data, MESSAGE)


# -- over-long command lines --------------------------------------------------


async def test_over_long_command_lines_get_500_and_the_session_goes_on(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    srv = await start_triaged()
    c = await connect(srv)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    long_line = b"NOOP " + b"x" * 4995 + b"\r\n"
    # 5,002 bytes in pieces of 700: the limit is passed with no LF in sight.
    await send_pieces(c, *(long_line[i : i + 700] for i in range(0, len(long_line), 700)))
    assert await c.reply() == TOO_LONG
    assert await c.cmd("NOOP") == NOOP_OK
    # Its LF and the next command in the same piece.
    await send_pieces(c, b"MAIL FROM:<" + b"a" * 3000, b"a" * 3000, b"@example.org>\r\nNOOP\r\n")
    assert await c.reply() == TOO_LONG
    assert await c.reply() == NOOP_OK
    assert "MAIL" not in capture.commands
    # Inside a transaction, 300 kB in one write: the transaction is still there.
    assert (await c.cmd("MAIL FROM:<a@example.org>"))[0] == 250
    c.writer.write(b"RCPT TO:<" + b"b" * 300_000 + b"@example.net>\r\n")
    assert await c.reply() == TOO_LONG
    assert (await c.cmd("RCPT TO:<b@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    assert await c.data(MESSAGE) == QUEUED
    [got] = capture.messages
    assert got.recipients == ["b@example.net"]
    assert_relayed(got.data, MESSAGE)
    assert await c.cmd("QUIT") == BYE
    await c.close()


# -- back-pressure: a client that never reads its replies ----------------------


async def _converse(
    sock: socket.socket, deadline: float, *, send: bytes = b"", want: int | None = None
) -> bytes:
    """Read a non-blocking socket until `want` bytes came (None: until EOF),
    sending `send` meanwhile as the peer takes it."""
    buf = bytearray()
    while want is None or len(buf) < want:
        if send:
            try:
                send = send[sock.send(send) :]
            except BlockingIOError:
                pass
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{len(buf)} bytes read, {want} wanted"
            await asyncio.sleep(0.002)
            continue
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def test_a_client_not_reading_replies_is_not_buffered_without_bound(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """20 MB of pipelined NOOPs and no reply read: triaged stops reading (its
    replies wait in a bounded write buffer, its LineBuffer stays small) and
    the client's writes stall long before 20 MB. Then every NOOP gets its
    250, in order, and QUIT its 221."""
    total = 20_000_004  # a whole number of commands
    unit = b"NOOP\r\n"
    payload = unit * (1 << 16)
    srv = await start_triaged()
    host, port = srv.addresses[0]
    # Small kernel buffers on both sides (the accepted socket inherits the
    # listener's), so that the stall comes after some 100 kB rather than
    # megabytes of NOOPs: what is measured is what triaged itself holds.
    for listener in srv._servers[0].sockets:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        deadline = time.monotonic() + 20
        assert (await _converse(sock, deadline, want=1)).startswith(b"220 ")
        await wait_until(lambda: srv.ctx is not None and len(srv.ctx.connections) == 1, 5)
        session = only_session(srv)

        view = memoryview(payload)
        sent = held = 0
        refused = 0  # sends refused in a row, each after a turn of the loop
        last_progress = time.monotonic()
        while sent < total:
            try:
                n = sock.send(view[sent % len(payload) : min(len(payload), total - sent + sent % len(payload))])
            except BlockingIOError:
                n = 0
            held = max(held, len(session._lines._buf))
            if n:
                sent += n
                refused = 0
                last_progress = time.monotonic()
                await asyncio.sleep(0)
            elif refused >= 50 and time.monotonic() - last_progress > 0.25:
                break  # stalled: triaged takes no more
            else:
                refused += 1
                await asyncio.sleep(0.005)
            assert time.monotonic() < deadline
        transport = session.transport
        assert transport is not None
        # Not isinstance(): uvloop's transports do not derive from asyncio's.
        transport = cast(asyncio.WriteTransport, transport)
        assert sent < 2 * MIB, f"triaged took in {sent} bytes of commands it could not answer"
        assert held < MIB and len(session._lines._buf) < MIB, held
        assert transport.get_write_buffer_size() < MIB
        assert session._paused  # pause_writing: its replies wait for us
        assert session._lines._reading_paused  # and it reads no more commands

        # Read what is owed while finishing the last command, then QUIT.
        rest = unit[sent % len(unit) :] if sent % len(unit) else b""
        rest += b"QUIT\r\n"
        owed = -(-sent // len(unit))
        expected = b"250 2.0.0 OK\r\n" * owed + b"221 2.0.0 Bye\r\n"
        got = await _converse(sock, deadline, send=rest)
        assert len(got) == len(expected) and got == expected
    finally:
        sock.close()
    await wait_until(lambda: srv.ctx is not None and not srv.ctx.connections, 5)
    assert capture.commands == []


# -- a client that leaves mid-line ---------------------------------------------


async def test_half_a_command_line_then_close(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged()
    assert srv.ctx is not None
    ctx = srv.ctx
    # Closed outright.
    c = await connect(srv)
    assert (await c.cmd("EHLO client.test"))[0] == 250
    await send_pieces(c, b"MAIL FROM:<a@exa")
    assert len(ctx.connections) == 1
    await c.close()
    await wait_until(lambda: not ctx.connections, 5, what="the session ended")
    # Half-closed: triaged answers nothing and closes its side.
    c = await connect(srv)
    await send_pieces(c, b"MAIL FROM:<a@example.org>")
    c.writer.write_eof()
    assert await read_to_eof(c) == b""
    await wait_until(lambda: not ctx.connections, 5, what="the session ended")
    await c.close()
    assert "MAIL" not in capture.commands and capture.messages == []


async def test_half_a_body_line_then_close(start_triaged: StartTriaged, capture: CaptureServer) -> None:
    srv = await start_triaged()
    assert srv.ctx is not None
    ctx = srv.ctx
    for half_close in (False, True):
        c = await connect(srv)
        c.writer.write(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        assert [(await c.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
        await send_pieces(c, b"Subject: half\r\n\r\n" + b"y" * 100_000 + b"\r\nhalf a li")
        assert len(ctx.connections) == 1
        if half_close:
            c.writer.write_eof()
            assert await read_to_eof(c) == b""
        await c.close()
        await wait_until(lambda: not ctx.connections, 5, what="the session ended")
    assert capture.messages == [] and "DATA" not in capture.commands
    assert ctx.inflight_bytes == 0


async def test_a_finished_session_is_freed_by_reference_counting(
    start_triaged: StartTriaged, capture: CaptureServer
) -> None:
    """A session leaves no reference cycle behind (its method table, buffer
    and timer point back at it only while it runs), so a closed connection
    is freed at once, not by the cycle collector: one collection of ~3,700
    objects per ~350 messages before (bench/results/cpu_profile.md)."""
    srv = await start_triaged()
    assert srv.ctx is not None
    ctx = srv.ctx
    for send_message in (False, True):
        gc.disable()
        try:
            c = await connect(srv)
            assert (await c.cmd("EHLO client.test"))[0] == 250
            [session] = list(ctx.connections)
            ref = weakref.ref(session)
            del session
            if send_message:
                assert (await c.send_message("a@example.org", ["b@example.net"], MESSAGE)) == QUEUED
            assert (await c.cmd("QUIT")) == BYE
            await c.close()
            await wait_until(lambda: not ctx.connections, 5, what="the session ended")
            for _ in range(10):  # the loop drops its last handles to it
                if ref() is None:
                    break
                await asyncio.sleep(0.01)
            assert ref() is None, gc.get_referrers(ref())
        finally:
            gc.enable()
