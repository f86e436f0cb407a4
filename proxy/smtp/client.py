"""A small SMTP client for the next hop (RFC 5321), on asyncio streams.

Written here instead of driving aiosmtplib because the relay needs exactly
MAIL/RCPT/DATA/RSET/NOOP/XFORWARD with per-command deadlines and the raw
reply handed back verbatim, and because its per-command cost is a large part
of the relay's CPU budget. Every network wait sits under a deadline; any
transport failure raises UpstreamError so the caller answers 4xx.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

from proxy.smtp.dotstuff import Piece, ends_with_crlf, stuffed

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


class SmtpClient:
    """One connection to the next hop. Not safe for concurrent use."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        command_timeout_s: float,
        data_timeout_s: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
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
        try:
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        except TimeoutError:
            raise UpstreamError("connect timed out", timeout=True, connect=True) from None
        except OSError as exc:
            raise UpstreamError(f"connect failed: {exc.strerror}", connect=True) from None
        client = cls(
            reader, writer, command_timeout_s=command_timeout_s, data_timeout_s=data_timeout_s
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
                await self.writer.start_tls(context, server_hostname=host)
        except TimeoutError:
            raise UpstreamError("TLS handshake timed out", timeout=True, connect=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"TLS handshake failed: {exc}", connect=True) from None
        await self.ehlo(helo_name)  # RFC 3207 4.2: forget what we knew

    async def command(self, line: str) -> Reply:
        if "\r" in line or "\n" in line:
            # The session refuses such input first; this is the last guard
            # against a second command smuggled inside an argument.
            raise UpstreamError("refusing to send a command line holding CR or LF")
        self._send(line.encode("utf-8", "surrogateescape") + b"\r\n")
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
                            await self.writer.drain()  # at once below the high-water mark
                    self._send(b".\r\n" if ends_with_crlf(pieces) else b"\r\n.\r\n")
                    await self.writer.drain()
            except TimeoutError:
                self.close()
                raise UpstreamError("data write timed out", timeout=True) from None
            except OSError as exc:
                self.close()
                raise UpstreamError(f"connection lost: {type(exc).__name__}") from None
        self.transactions += 1
        return await self._read_reply(self.data_timeout_s)

    async def xforward(self, attrs: dict[str, str]) -> None:
        """Postfix XFORWARD (XFORWARD_README), only the attributes offered."""
        offered = set(self.extensions.get("XFORWARD", "").upper().split())
        parts = [f"{k}={v}" for k, v in attrs.items() if k in offered]
        # Lines stay short: Postfix limits a command line to 512 bytes.
        line = ""
        for part in parts:
            if line and len(line) + len(part) > 400:
                await self.command(f"XFORWARD{line}")
                line = ""
            line += " " + part
        if line:
            await self.command(f"XFORWARD{line}")

    async def mail(self, sender: str, options: list[str]) -> Reply:
        return await self.command(_with_options(f"MAIL FROM:{_angle(sender)}", options))

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
        return not self.broken and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.broken = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.writer.is_closing():
            self.writer.close()

    async def quit(self) -> None:
        if self.usable:
            try:
                self._send(b"QUIT\r\n")
                async with asyncio.timeout(1.0):
                    await self.reader.read(1024)
            except Exception:  # best effort: the connection is going away anyway
                pass
        self.close()

    # -- wire ----------------------------------------------------------

    def _send(self, data: Piece) -> None:
        if self.broken or self.writer.is_closing():
            self.broken = True
            raise UpstreamError("connection closed")
        self.writer.write(data)
        self.last_used = time.monotonic()

    async def _read_reply(self, timeout_s: float) -> Reply:
        """One (possibly multi-line) reply; lines joined by newlines, codes stripped.

        Within `timeout_s`, else UpstreamError(timeout=True) and the
        connection is closed (see _watch)."""
        lines: list[str] = []
        self._watch(timeout_s)
        try:
            while True:
                raw = await self.reader.readuntil(b"\n")
                line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(line) < 3 or not line[:3].isdigit():
                    raise UpstreamError("malformed reply")
                lines.append(line[4:])
                if line[3:4] != "-":
                    code = int(line[:3])
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            self.close()
            if self._timed_out:
                raise UpstreamError("reply timed out", timeout=True) from None
            raise UpstreamError(f"connection lost: {type(exc).__name__}") from None
        except UpstreamError:
            self.close()
            raise
        finally:
            self._awaiting = False
        self.last_used = time.monotonic()
        return Reply(code, "\n".join(lines))

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
        self.writer.transport.abort()


def _angle(address: str) -> str:
    if address.startswith("<"):
        return address  # "<>", the null sender, as aiosmtpd hands it over
    return f"<{address}>"


def _with_options(line: str, options: list[str]) -> str:
    return f"{line} {' '.join(options)}" if options else line
