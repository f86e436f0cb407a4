"""A small SMTP client for the next hop (RFC 5321), on an asyncio Protocol.

Written here instead of driving aiosmtplib because the relay needs exactly
MAIL/RCPT/DATA/RSET/NOOP/XFORWARD with per-command deadlines and the raw
reply handed back verbatim, and because its per-command cost is a large part
of the relay's CPU budget. Every network wait sits under a deadline; any
transport failure raises UpstreamError so the caller answers 4xx.

The next hop's bytes are cut into replies in `data_received` (_HopProtocol)
and a waiting command gets its reply through one future: no StreamReader,
whose readuntil, buffer bookkeeping and waiter per line cost about a tenth
of the relay's Python per message (bench/results/cpu_profile.md).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import cast

from proxy.smtp.dotstuff import Piece, ends_with_crlf, stuffed
from proxy.smtp.flow import WriteFlow

# A message up to _SMALL bytes goes out in one write; a larger one in
# views of _WRITE_CHUNK, each after the transport drained (see data()).
_SMALL = 1 << 16
_WRITE_CHUNK = 1 << 20


class UpstreamError(Exception):
    """The next hop is unreachable, timed out, or dropped the connection."""

    def __init__(self, message: str, *, timeout: bool = False, connect: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.connect = connect


class Reply:
    __slots__ = ("code", "message")

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.message!r})"


# The longest reply line accepted: a next hop that sends more without a
# line end is broken (what StreamReader's limit was before).
_MAX_LINE = 1 << 16


class _HopProtocol(WriteFlow, asyncio.Protocol):
    """The connection's byte side: replies parsed as they arrive, handed to
    the one command waiting (the client is not pipelined), or kept in order
    for the next read if none waits (a 421 sent before our command)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._partial = b""  # an incomplete line
        self._lines: list[str] = []  # the continuation lines of a multi-line reply
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[Reply] | None = None
        self._error: UpstreamError | None = None  # once set, every later read fails

    @property
    def at_eof(self) -> bool:
        return self._error is not None

    @property
    def has_reply(self) -> bool:
        """A reply came before the command that will read it (a 421 before
        the next hop closed, RFC 5321 3.8)."""
        return bool(self._replies)

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if end - start > _MAX_LINE:
                self._fail(UpstreamError("connection lost: reply line too long"))
                return
            line = data[start:end].rstrip(b"\r\n").decode("utf-8", "replace")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(UpstreamError("malformed reply"))
                return
            if line[3:4] == "-":
                self._lines.append(line[4:])
                continue
            lines, self._lines = self._lines, []
            lines.append(line[4:])
            self._deliver(Reply(int(line[:3]), lines[0] if len(lines) == 1 else "\n".join(lines)))
        if start < len(data):
            if len(data) - start > _MAX_LINE:
                self._fail(UpstreamError("connection lost: reply line too long"))
                return
            self._partial = data[start:]

    def eof_received(self) -> bool | None:
        self._fail(UpstreamError("connection lost: IncompleteReadError"))
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        name = type(exc).__name__ if exc is not None else "IncompleteReadError"
        self._fail(UpstreamError(f"connection lost: {name}"))
        self._drain_lost()

    # -- for the client --------------------------------------------------

    async def reply(self) -> Reply:
        if self._replies:
            return self._replies.popleft()
        if self._error is not None:
            raise self._error
        waiter: asyncio.Future[Reply] = self._loop.create_future()
        self._waiter = waiter
        try:
            return await waiter
        finally:
            self._waiter = None

    def _deliver(self, reply: Reply) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(reply)
        else:
            self._replies.append(reply)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._error)
        if self.transport is not None:
            self.transport.close()


class SmtpClient:
    """One connection to the next hop. Not safe for concurrent use."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _HopProtocol,
        *,
        command_timeout_s: float,
        data_timeout_s: float,
    ) -> None:
        self._transport = transport
        self._proto = protocol
        self.command_timeout_s = command_timeout_s
        self.data_timeout_s = data_timeout_s
        self.extensions: dict[str, str] = {}
        self.last_used = time.monotonic()
        self.transactions = 0
        self.broken = False
        self.reused = False
        # The reply deadline (see _watch): one loop timer per connection,
        # moved lazily, instead of an asyncio.timeout() per command.
        self._loop = asyncio.get_running_loop()
        self._awaiting = False  # a reply is being read
        self._deadline = 0.0  # loop.time() by which it must have come
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timed_out = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        helo_name: str,
        connect_timeout_s: float,
        command_timeout_s: float,
        data_timeout_s: float,
        starttls: str = "none",
        tls_context: ssl.SSLContext | None = None,
    ) -> SmtpClient:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    lambda: _HopProtocol(loop), host, port
                )
        except TimeoutError:
            raise UpstreamError("connect timed out", timeout=True, connect=True) from None
        except OSError as exc:
            raise UpstreamError(f"connect failed: {exc.strerror}", connect=True) from None
        client = cls(
            transport, protocol, command_timeout_s=command_timeout_s, data_timeout_s=data_timeout_s
        )
        try:
            greeting = await client._read_reply(connect_timeout_s)
            if greeting.code != 220:
                raise UpstreamError(f"greeting {greeting.code}", connect=True)
            await client.ehlo(helo_name)
            if starttls != "none":
                if "STARTTLS" in client.extensions:
                    await client._starttls(helo_name, tls_context or ssl.create_default_context(), host)
                elif starttls == "require":
                    raise UpstreamError("next hop does not offer STARTTLS", connect=True)
        except BaseException:
            client.close()
            raise
        return client

    # -- commands ------------------------------------------------------

    async def ehlo(self, name: str) -> None:
        reply = await self.command(f"EHLO {name}")
        if not reply.ok:
            reply = await self.command(f"HELO {name}")
            if not reply.ok:
                raise UpstreamError(f"HELO refused {reply.code}", connect=True)
            self.extensions = {}
            return
        ext: dict[str, str] = {}
        for line in reply.message.splitlines()[1:]:
            keyword, _, params = line.partition(" ")
            ext[keyword.upper()] = params
        self.extensions = ext

    async def _starttls(self, helo_name: str, context: ssl.SSLContext, host: str) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise UpstreamError(f"STARTTLS refused {reply.code}", connect=True)
        try:
            async with asyncio.timeout(self.command_timeout_s):
                transport = await self._loop.start_tls(
                    self._transport, self._proto, context, server_hostname=host
                )
                if transport is None:  # the connection closed during the handshake
                    raise ConnectionResetError("connection lost")
                self._transport = self._proto.transport = transport
        except TimeoutError:
            raise UpstreamError("TLS handshake timed out", timeout=True, connect=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"TLS handshake failed: {exc}", connect=True) from None
        await self.ehlo(helo_name)  # RFC 3207 4.2: forget what we knew

    async def command(self, line: str) -> Reply:
        self._send(_wire(line))
        return await self._read_reply(self.command_timeout_s)

    async def data(self, pieces: Sequence[Piece]) -> Reply:
        """DATA with dot-stuffing (RFC 5321 4.5.2); the final reply.

        The message comes in pieces (proxy/smtp/stamp.py `stamp_pieces`).
        Most mail is small and goes out in one write. A large message goes
        out in views of at most _WRITE_CHUNK bytes, each written once the
        transport's buffer has drained: nothing copies it, and the transport
        never holds more than a chunk of it (issue 9, finding 7).
        """
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        if sum(len(p) for p in pieces) <= _SMALL:
            content = b"".join(pieces)
            if content.startswith(b"."):
                content = b"." + content
            content = content.replace(b"\r\n.", b"\r\n..")
            if content and not content.endswith(b"\r\n"):
                content += b"\r\n"
            self._send(content + b".\r\n")
        else:
            try:
                async with asyncio.timeout(self.data_timeout_s):
                    for piece in stuffed(pieces):
                        for at in range(0, len(piece), _WRITE_CHUNK):
                            self._send(piece[at : at + _WRITE_CHUNK])
                            await self._proto.drain_writes(self._transport, self._loop)  # at once below the high-water mark
                    self._send(b".\r\n" if ends_with_crlf(pieces) else b"\r\n.\r\n")
                    await self._proto.drain_writes(self._transport, self._loop)
            except TimeoutError:
                self.close()
                raise UpstreamError("data write timed out", timeout=True) from None
            except asyncio.CancelledError:
                self.close()  # half a body went out: never reuse this connection
                raise
            except OSError as exc:
                self.close()
                raise UpstreamError(f"connection lost: {type(exc).__name__}") from None
        self.transactions += 1
        return await self._read_reply(self.data_timeout_s)

    async def mail(
        self, sender: str, options: list[str], xforward: Mapping[str, str] | None = None
    ) -> Reply:
        """MAIL, after Postfix XFORWARD (XFORWARD_README) for the attributes in
        `xforward` that the next hop offered; the MAIL reply.

        With PIPELINING the XFORWARD lines and MAIL go out in one write and
        their replies are read in order (XFORWARD_README: the command may be
        pipelined), so telling the next hop who the client is costs no round
        trip. XFORWARD's own replies are not checked: a next hop that refuses
        the attributes still takes the mail, it only logs our address.
        """
        lines = _xforward_lines(xforward, self.extensions) if xforward else []
        lines.append(_with_options(f"MAIL FROM:{_angle(sender)}", options))
        if len(lines) == 1 or "PIPELINING" not in self.extensions:
            for line in lines[:-1]:
                await self.command(line)
            return await self.command(lines[-1])
        self._send(b"".join([_wire(line) for line in lines]))
        for _ in lines[:-1]:
            await self._read_reply(self.command_timeout_s)
        return await self._read_reply(self.command_timeout_s)

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        return await self.command(_with_options(f"RCPT TO:{_angle(recipient)}", options))

    async def rset(self) -> bool:
        try:
            return (await self.command("RSET")).ok
        except UpstreamError:
            return False

    async def noop(self) -> bool:
        try:
            return (await self.command("NOOP")).ok
        except UpstreamError:
            return False

    @property
    def usable(self) -> bool:
        return not self.broken and not self._proto.at_eof and not self._transport.is_closing()

    def close(self) -> None:
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._transport.is_closing():
            self._transport.close()

    async def quit(self) -> None:
        if self.usable:
            try:
                self._send(b"QUIT\r\n")
                async with asyncio.timeout(1.0):
                    await self._proto.reply()
            except Exception:  # best effort: the connection is going away anyway
                pass
        self.close()

    # -- wire ----------------------------------------------------------

    def _send(self, data: Piece) -> None:
        if self.broken or self._transport.is_closing():
            if not self.broken and self._proto.has_reply:
                # The next hop said why before it closed: that reply is what
                # the caller reads (and passes on), not a bare "closed".
                self.broken = True
                return
            self.broken = True
            raise UpstreamError("connection closed")
        self._transport.write(data)
        self.last_used = time.monotonic()

    async def _read_reply(self, timeout_s: float) -> Reply:
        """One (possibly multi-line) reply; lines joined by newlines, codes stripped.

        Within `timeout_s`, else UpstreamError(timeout=True) and the
        connection is closed (see _watch). A read cancelled by its caller
        closes the connection too: its reply would come to the next command."""
        self._watch(timeout_s)
        try:
            reply = await self._proto.reply()
        except UpstreamError:
            self.close()
            if self._timed_out:
                raise UpstreamError("reply timed out", timeout=True) from None
            raise
        except BaseException:
            self.close()
            raise
        finally:
            self._awaiting = False
        self.last_used = time.monotonic()
        return reply

    def _watch(self, timeout_s: float) -> None:
        """Set the deadline of the reply about to be awaited.

        An `asyncio.timeout()` per command (its object, a timer made and
        cancelled, two coroutines) cost about 10 us, four or five times per
        message. Instead the connection keeps one timer that fires at the
        earliest deadline it was armed for: while no reply is awaited it just
        lapses; before the current deadline it is re-armed for the rest; past
        it the connection is aborted, which ends the pending read at once and
        turns into UpstreamError(timeout=True) above. A timer is made only
        when none is armed or the new deadline comes sooner (a command after
        the longer DATA deadline): at most about one per message.
        """
        deadline = self._loop.time() + timeout_s
        self._deadline = deadline
        self._awaiting = True
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if not self._awaiting:
            return  # idle between commands: the next command arms a timer
        if self._loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self._loop.call_at(self._deadline, self._on_deadline)
            return
        self._timed_out = True
        self.broken = True
        self._transport.abort()


def _wire(line: str) -> bytes:
    """A command line as sent, CRLF ended."""
    if "\r" in line or "\n" in line:
        # The session refuses such input first; this is the last guard
        # against a second command smuggled inside an argument.
        raise UpstreamError("refusing to send a command line holding CR or LF")
    return line.encode("utf-8", "surrogateescape") + b"\r\n"


def _xforward_lines(attrs: Mapping[str, str], extensions: dict[str, str]) -> list[str]:
    """XFORWARD command lines for the attributes the next hop offered; each
    short, as Postfix limits a command line to 512 bytes."""
    offered = set(extensions.get("XFORWARD", "").upper().split())
    lines: list[str] = []
    line = ""
    for k, v in attrs.items():
        if k not in offered:
            continue
        part = f"{k}={v}"
        if line and len(line) + len(part) > 400:
            lines.append(f"XFORWARD{line}")
            line = ""
        line += " " + part
    if line:
        lines.append(f"XFORWARD{line}")
    return lines


def _angle(address: str) -> str:
    if address.startswith("<"):
        return address  # "<>", the null sender, as aiosmtpd hands it over
    return f"<{address}>"


def _with_options(line: str, options: list[str]) -> str:
    return f"{line} {' '.join(options)}" if options else line
