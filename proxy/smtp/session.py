"""The client-facing SMTP session: aiosmtpd, with real before-queue proxy
semantics (Postfix SMTPD_PROXY_README).

MAIL and each RCPT are forwarded to the next hop as they arrive and its reply
goes back verbatim; at the end of DATA the message is classified, stamped,
sent, and the client gets the next hop's final reply. Any failure of ours or
of the next hop's transport is a 4xx: the client keeps the mail.

Built on aiosmtpd's verbs and seams: handler hooks for MAIL/RCPT/RSET/
HELO/EHLO, the transaction's state on our own Envelope (`_create_envelope`,
see proxy/smtp/envelope.py for the next-hop lease), and `smtp_*` methods
for XFORWARD and DATA. The connection is ours: bytes go from data_received
into a LineBuffer (proxy/smtp/linebuffer.py) and replies straight to the
transport, and the command loop (`_command_loop`) is aiosmtpd's, rewritten
on that buffer: no StreamReader, StreamWriter or per-line log call. DATA is
overridden: we read the message in large chunks (not line by line), without
a line-length limit (the relay must be byte-exact), with SIZE enforced after
reading (RFC 5321 4.5.3.1.10), a global bound on buffered bytes, and the
bare-CR/LF policy of proxy/smtp/syntax.py. The few private aiosmtpd
internals this needs are in proxy/smtp/compat.py.

Drain (SIGTERM, RFC 5321 3.8): idle sessions get 421 at once; a session in
a transaction or waiting on the next hop gets 421 after its last reply;
a message body is never read as commands (its connection is closed).
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from collections.abc import Callable
from itertools import count
from typing import Any, cast

import structlog
from aiosmtpd.smtp import MISSING, SMTP, Session

from classifier.addresses import Networks
from proxy import verdict as V
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline, message_id_of
from proxy.proxyproto import ProxyError, ProxyHeader, parse
from proxy.settings import ListenerSettings, Settings
from proxy.smtp import compat, syntax
from proxy.smtp import envelope as lease
from proxy.smtp.client import Reply, UpstreamError
from proxy.smtp.envelope import RelayEnvelope
from proxy.smtp.flow import WriteFlow
from proxy.smtp.linebuffer import ClientGone, LineBuffer
from proxy.smtp.stamp import stamp_pieces
from proxy.smtp.upstream import Upstream
from proxy.verdict import Verdict

log = structlog.get_logger("triaged.smtp")


# "<local@domain>" with dot-atom text only (RFC 5321 4.1.2), then parameters.
_PLAIN_PATH = re.compile(r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)$", re.S)
_DATA_CHUNK = 1 << 20  # read DATA in pieces of up to 1 MiB
_PROXY_TIMEOUT_S = 10.0
_PROXY_LINE_LIMIT = 1001  # a PROXY v1 line is at most 107 bytes
_END = b"\r\n.\r\n"  # a DATA body's end (RFC 5321 4.1.1.4)
# Buffered client bytes above which the transport stops reading: between
# commands (a line is at most 1001 bytes; an MTA pipelining a hundred RCPTs
# sends ~5 KB), and while a body is read in _DATA_CHUNK pieces. Per
# connection, so 1,000 idle clients that send and never read hold ~16 MiB.
_COMMAND_HIGH_WATER = 1 << 14
_DATA_HIGH_WATER = 2 * _DATA_CHUNK
_XFORWARD_ATTRS = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"})
_QUEUE_PREFIX = f"{os.getpid():x}"
# Replies -> with their enhanced status code (verdict.with_enhanced, a regex
# per reply): most replies repeat (220, 250, 354, 221); bounded, since a next
# hop's final reply usually carries a queue id.
_ENHANCED: dict[str, str] = {}
_queue_ids = count(1)


class RelayContext:
    """What every session of one server shares."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        upstream: Upstream,
        metrics: Metrics,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.upstream = upstream
        self.metrics = metrics
        self.tls_context = tls_context
        self.allowed = Networks(settings.server.allowed_clients)
        self.xforward_clients = Networks(settings.server.xforward_clients)
        self.connections: set[TriageSMTP] = set()
        self.idle_leases = lease.IdleLeases()
        self.inflight_bytes = 0
        self.draining = False
        # Read at scrape time: no gauge update (a lock and two calls) at
        # every connect and disconnect.
        metrics.connections_open.set_function(lambda: len(self.connections))
        self.greeting = f"220 {settings.server.hostname} {compat.IDENT}"
        self.handler = RelayHandler(self)
        h = self.handler
        self.hooks = {m[7:]: getattr(h, m) for m in dir(h) if m.startswith("handle_")}

    def reserve(self, n: int) -> bool:
        if self.inflight_bytes + n > self.settings.server.max_inflight_data_bytes:
            return False
        self.inflight_bytes += n
        return True

    def unreserve(self, n: int) -> None:
        self.inflight_bytes -= n


class TriageSMTP(WriteFlow, SMTP):
    """One client connection."""

    envelope: RelayEnvelope | None

    def __init__(self, ctx: RelayContext, listener: ListenerSettings) -> None:
        s = ctx.settings.server
        compat.init_session(
            self,
            handler=ctx.handler,
            hooks=ctx.hooks,
            commands=_SMTP_COMMANDS,
            hostname=s.hostname,
            data_size_limit=s.max_message_bytes,
            tls_context=ctx.tls_context,
            timeout_s=s.idle_timeout_s,
        )
        self.ctx = ctx
        self.listener = listener
        self.proxy: ProxyHeader | None = None
        self.peer_host = ""
        self.client_address = ""
        self.in_data = False
        self.busy = False  # a command is waiting for the next hop
        self.closed = False  # connection lost: a lease coming back goes to the pool
        self.reserved = 0  # bytes of this session's DATA counted in ctx.inflight_bytes
        self._in_ehlo = False
        self._ehlo_lines: list[bytes] | None = None  # the EHLO reply being gathered (push)
        self._rejected = False
        self._deadline = 0.0  # loop.time() the client must have sent its next command by
        self._armed_at = 0.0  # when the connection's timer fires (see _reset_timeout)
        self._lines = LineBuffer(self.loop, _COMMAND_HIGH_WATER)
        self._quit = False

    def _create_envelope(self) -> RelayEnvelope:
        # aiosmtpd's seam for per-transaction state: called at connect,
        # HELO/EHLO, RSET and after DATA. What the old transaction still
        # leased from the pool goes back now.
        if self.envelope is not None:
            lease.end(self.envelope, self.ctx)
        return RelayEnvelope()

    # -- connection life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # STARTTLS: the TLS layer is up on the same connection. Start
            # afresh (RFC 3207 4.2) and never read plaintext sent before
            # the handshake as commands.
            self._lines.clear()
            self._start_session(transport)
            assert self._tls_protocol is not None and self.session is not None
            self.session.ssl = self._tls_protocol._extra
            hook = self._handle_hooks.get("STARTTLS")
            self._tls_handshake_okay = True if hook is None else hook(self, self.session, self.envelope)
            return
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        self.peer_host = self.client_address = str(peer[0]) if peer else ""
        refusal = None
        if ctx.draining:
            refusal = V.SHUTTING_DOWN
        elif not self.listener.proxy_protocol and self.peer_host not in ctx.allowed:
            # Behind PROXY the allowlist applies to the real client, later.
            # Before the count: a client never allowed gets the permanent answer.
            refusal = V.GREETING_DENIED
            ctx.metrics.connections.labels("denied").inc()
        elif len(ctx.connections) >= ctx.settings.server.max_connections:
            refusal = V.TOO_MANY_CONNECTIONS
            ctx.metrics.connections.labels("too_many").inc()
        if refusal is not None:
            # Answer at once without starting a session (RFC 5321 3.1).
            log.info("connection_refused", peer=self.peer_host, reply=refusal[:9])
            self._rejected = True
            # Not isinstance(transport, asyncio.WriteTransport): uvloop's
            # transports do not derive from asyncio's classes.
            cast(asyncio.WriteTransport, transport).write(refusal.encode() + b"\r\n")
            transport.close()
            return
        ctx.connections.add(self)
        ctx.metrics.connections_accepted.inc()
        self._start_session(transport, peer)
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def _start_session(self, transport: asyncio.BaseTransport, peer: Any = None) -> None:
        """What aiosmtpd's connection_made sets up, at connect and after STARTTLS."""
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.session = self._create_session()
        self.session.peer = peer if peer is not None else transport.get_extra_info("peername")
        self.transport = transport
        self._lines.attach(transport)
        self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        self._lines.feed(data)

    def eof_received(self) -> bool | None:
        # As aiosmtpd: the client is gone, so the session is too (a relay in
        # progress is cancelled and its lease goes back).
        self._lines.feed_eof()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        # Plain TCP: keep the transport until the session closes it (True);
        # TLS cannot be half-open (an SSL transport warns on True).
        return self.session is not None and self.session.ssl is None

    def connection_lost(self, error: Exception | None) -> None:
        if self._rejected or self.closed:
            return
        ctx = self.ctx
        ctx.connections.discard(self)
        self.closed = True
        if self.envelope is not None:
            lease.end(self.envelope, ctx)
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self._original_transport is not None:
            # After STARTTLS the TLS transport is ours; the TCP one below it
            # must be closed too.
            self._original_transport.close()
        self._lines.feed_eof()
        self._drain_lost()
        task = self._handler_coroutine
        if task is not None and not task.done():
            task.cancel()
        self._lines.detach()
        self._timeout_handle = None
        self.transport = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates a loop timer at every command (and
        # we twice per DATA): about ten timers per message. Here the deadline
        # moves and the one timer of the connection stays; when it fires
        # before the deadline it is re-armed for the rest. Only a deadline
        # earlier than the armed timer (back from the longer DATA timeout)
        # re-arms at once. Same deadlines, a timer per message or less.
        loop = self.loop
        deadline = loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or deadline < self._armed_at:
            if handle is not None:
                handle.cancel()
            self._armed_at = deadline
            self._timeout_handle = loop.call_at(deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._armed_at = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("client_timeout", peer=self.peer_host, in_data=self.in_data)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        try:
            if self.listener.proxy_protocol and not await self._read_proxy_header():
                return
            await self.push(self.ctx.greeting)
            await self._command_loop()
        except (ConnectionError, ClientGone):
            pass  # the client went away; nothing to answer
        finally:
            # The bound-method table points back at this session: without
            # it the session is freed by reference counting when the
            # connection goes, not left to the cycle collector.
            self._smtp_methods = {}

    async def _command_loop(self) -> None:
        """aiosmtpd's command loop (SMTP._handle_client, 1.4), on our buffer:
        the same checks in the same order and the same replies. What is left
        out is what this server never enables (AUTH, require_starttls, the
        per-command call limits, PROXY through aiosmtpd) and aiosmtpd's
        per-line debug logging."""
        lines = self._lines
        methods = self._smtp_methods
        bogus_budget = compat.BOGUS_LIMIT
        while self.transport is not None and not self._quit:
            try:
                raw = await lines.line(self.line_length_limit)
                if raw is None:
                    await self.push("500 Command line too long")
                    continue
                line = raw.rstrip(b"\r\n")
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                # The argument keeps any byte (SMTPUTF8 is on): surrogateescape
                # gives the original bytes back when it is sent on.
                arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
                assert self.session is not None
                if self.session.extended_smtp:
                    max_size = self.command_size_limits[command]
                else:
                    max_size = self.command_size_limit
                if len(line) > max_size:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                method = methods.get(command)
                if method is None:
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        log.warning("too_many_unknown_commands", peer=self.peer_host)
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self._close()
                        return
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()  # a valid command: the client is alive
                await method(arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._close()
                raise
            except ClientGone:
                self._close()
                return
            except compat.TLSSetupException as exc:
                # The TLS layer never came up, so it will not tell us the
                # connection is lost: clean up as aiosmtpd does.
                log.info("tls_handshake_failed", peer=self.peer_host, error=str(exc.__cause__))
                self._close()
                self.connection_lost(exc)
                return
            except Exception as error:
                try:
                    status = await self.handle_exception(error)
                except Exception as inner:
                    status = f"500 Error: ({type(inner).__name__}) {inner}"
                await self.push(status)

    async def smtp_QUIT(self, arg: str | None) -> None:
        # aiosmtpd's, ending the command loop instead of cancelling its task.
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        self._quit = True
        self._close()

    async def _read_proxy_header(self) -> bool:
        buf = b""
        try:
            async with asyncio.timeout(_PROXY_TIMEOUT_S):
                while True:
                    result = parse(buf)
                    if not isinstance(result, int):
                        break
                    if buf.startswith(b"PROXY") or (buf[:1] == b"P" and result == 1):
                        line = await self._lines.line(_PROXY_LINE_LIMIT)
                        if line is None:
                            raise ProxyError("PROXY line too long")
                        buf += line
                    else:
                        buf += await self._lines.exactly(result)
        except (ProxyError, TimeoutError, ClientGone) as exc:
            log.warning("proxy_header_invalid", peer=self.peer_host, error=type(exc).__name__)
            self._close()
            return False
        header, _used = result
        self.proxy = header
        if header.source is not None:
            # A LOCAL header (HAProxy health check) keeps the real peer and
            # goes on as a normal session (proxy-protocol.txt 2.2).
            self.client_address = header.source[0]
        if self.client_address not in self.ctx.allowed:
            self.ctx.metrics.connections.labels("denied").inc()
            await self.push(V.GREETING_DENIED)
            self._close()
            return False
        return True

    def _open_transport(self) -> asyncio.WriteTransport:
        """The transport to write a reply on; ConnectionResetError once it
        is closing (as StreamWriter.drain() raised for aiosmtpd)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        # Not isinstance(): uvloop's transports do not derive from asyncio's.
        return cast(asyncio.WriteTransport, transport)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Drain: close the session now with 421 (RFC 5321 3.8).

        self.transport follows a STARTTLS switch; the transport is closed,
        so nothing the client still sends (the rest of a message body) is
        ever read as commands.
        """
        if self.transport is not None and not self.transport.is_closing():
            self._open_transport().write(V.SHUTTING_DOWN.encode() + b"\r\n")
            self.transport.close()

    @property
    def in_transaction(self) -> bool:
        return self.in_data or bool(self.envelope is not None and self.envelope.mail_from)

    @property
    def idle(self) -> bool:
        """Between commands (or inside a partial line) with no transaction
        open: a drain may close it at once."""
        return not self.busy and not self.in_transaction

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Fast path for the plain "<local@domain> PARAMS" nearly all MTAs
        # send; anything else goes through aiosmtpd's RFC 5322 parser.
        m = _PLAIN_PATH.match(arg)
        if m is not None:
            return m.group(1), m.group(2).lstrip()
        addr, rest = super()._getaddr(arg)
        return addr, rest

    # -- replies ---------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not self._in_ehlo and "\r\n" not in status:
                enhanced = _ENHANCED.get(status)
                if enhanced is None:
                    enhanced = V.with_enhanced(status)
                    if len(_ENHANCED) < 512:
                        _ENHANCED[status] = enhanced
                status = enhanced
            status = status.encode()  # SMTPUTF8 is on (compat.init_session)
        if self._ehlo_lines is not None:
            # aiosmtpd pushes the EHLO reply line by line: one write (a
            # syscall, a segment, a wake-up of the client) per line. Gathered
            # here, they go out in one write when smtp_EHLO ends.
            self._ehlo_lines.append(status + b"\r\n")
            return
        self._open_transport().write(status + b"\r\n")
        # aiosmtpd's push awaits drain() after every reply; it only waits
        # when the client stopped reading (paused), so the await (a
        # coroutine per reply) is skipped otherwise.
        if self._paused:
            await self.drain_writes(self.transport, self.loop)
        if self.ctx.draining and not self._in_ehlo and self.idle and status[:3] != b"221":
            # Draining: the command this answered was the last (RFC 5321 3.8).
            self.shutdown()

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session_error", peer=self.peer_host, error=type(error).__name__)
        return V.INTERNAL_ERROR

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False
            lines, self._ehlo_lines = self._ehlo_lines, None
            if lines:
                self._open_transport().write(b"".join(lines))
                if self._paused:
                    await self.drain_writes(self.transport, self.loop)
        if self.ctx.draining and self.idle:
            self.shutdown()

    # -- XFORWARD (Postfix XFORWARD_README) --------------------------------

    def xforward_allowed(self) -> bool:
        return self.client_address in self.ctx.xforward_clients

    def forwarded_attributes(self) -> dict[str, str]:
        """What the next hop should log as the client: the XFORWARD our
        client sent, else the real client from a PROXY header (behind HAProxy
        the TCP peer is only the balancer)."""
        assert self.envelope is not None
        if self.envelope.xforward:
            return self.envelope.xforward
        if self.proxy is not None and self.proxy.source is not None:
            host, port = self.proxy.source
            return {"ADDR": host, "PORT": str(port)}
        return {}

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if not self.xforward_allowed():
            await self.push(V.XFORWARD_DENIED)
            return
        assert self.envelope is not None
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attrs: dict[str, str] = {}
        for item in (arg or "").split():
            name, eq, value = item.partition("=")
            name = name.upper()
            # Values go into a command line to the next hop: printable only.
            if not eq or name not in _XFORWARD_ATTRS or not syntax.valid_xforward_value(value):
                await self.push(V.XFORWARD_BAD)
                return
            attrs[name] = value
        if not attrs:
            await self.push(V.XFORWARD_BAD)
            return
        self.envelope.xforward.update(attrs)
        await self.push(V.XFORWARD_OK)

    # -- DATA ----------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        ctx = self.ctx
        started = time.perf_counter()
        if envelope.broken or (envelope.hop is None and not envelope.parked):
            # The next hop failed (or answered a replay differently) earlier.
            await self.push(V.TRANSACTION_LOST if envelope.broken else V.UPSTREAM_FAILED)
            return
        if ctx.inflight_bytes >= ctx.settings.server.max_inflight_data_bytes:
            self._refused(envelope, V.INSUFFICIENT_MEMORY, 0, started)
            await self.push(V.INSUFFICIENT_MEMORY)
            return
        if envelope.parked:
            # Resume before 354, so that a next hop that now answers
            # differently is told before the client sends the whole body.
            self.busy = True
            try:
                got = await lease.resume(ctx, envelope, self.forwarded_attributes(), "data")
            finally:
                self.busy = False
            if isinstance(got, str):
                self._refused(envelope, got, 0, started)
                await self.push(got)
                return
            lease.put(envelope, got, ctx, closed=self.closed)
        self.in_data = True
        self._reset_timeout(ctx.settings.server.data_timeout_s)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                content, size, refusal = await self._read_data()
            except Exception as exc:
                # Where the body ends is unknown now: answering and reading
                # on would take the rest of it as commands. Close instead.
                log.error("data_read_failed", peer=self.peer_host, error=type(exc).__name__)
                if self.transport is not None and not self.transport.is_closing():
                    self._open_transport().write(V.DATA_READ_FAILED.encode() + b"\r\n")
                self._close()
                return
            self._reset_timeout()
            if refusal is not None:
                self._refused(envelope, refusal, size, started)
                await self.push(refusal)
                return
            assert content is not None
            self.busy = True
            reply = await self._relay(envelope, content, started)
            await self.push(reply)
        finally:
            self.busy = False
            self.in_data = False
            # Also on a client hanging up mid-DATA: what was reserved comes back.
            ctx.unreserve(self.reserved)
            self.reserved = 0
            ctx.metrics.inflight_bytes.set(ctx.inflight_bytes)
            self._set_post_data_state()  # type: ignore[no-untyped-call]  # ends the lease
            if ctx.draining:
                self.shutdown()

    async def _read_data(self) -> tuple[bytes | None, int, str | None]:
        """(the message, bytes read, None) or (None, bytes read, refusal).
        Bytes held are in self.reserved. A refusal is answered only after
        the whole body was read (RFC 5321 4.2.5), holding none of it."""
        ctx = self.ctx
        server = ctx.settings.server
        limit = server.max_message_bytes + 5  # + the CRLF we add and ".CRLF"
        parts: list[bytes] = []
        size = 0
        refusal: str | None = None

        def on_chunk(chunk: bytes) -> None:
            nonlocal size, refusal
            size += len(chunk)
            if refusal is not None:
                return
            if size > limit:
                refusal = V.MESSAGE_TOO_BIG
            elif not ctx.reserve(len(chunk)):
                refusal = V.INSUFFICIENT_MEMORY
            else:
                self.reserved += len(chunk)
                parts.append(chunk)
                return
            parts.clear()  # keep reading, hold nothing
            ctx.unreserve(self.reserved)
            self.reserved = 0

        await self._read_body(on_chunk)
        size = max(size - 5, 0)
        if refusal is not None:
            return None, size, refusal
        ctx.metrics.inflight_bytes.set(ctx.inflight_bytes)
        message = syntax.message_from_stream(parts)
        parts.clear()
        if syntax.has_bare_line_ending(message):
            log.info("bare_line_ending", peer=self.peer_host, policy=server.bare_lf)
            if server.bare_lf == "reject":
                return None, size, V.BARE_LINE_ENDING
            message = syntax.normalize_line_endings(message)
        return syntax.unstuff(message), size, None

    async def _read_body(self, on_chunk: Callable[[bytes], None]) -> None:
        """Hand `on_chunk` the raw DATA stream in pieces of up to _DATA_CHUNK
        bytes: a CRLF we put in front (so that the end marker is always
        CRLF "." CRLF, also for an empty message), then the client's bytes
        up to and including the first CRLF "." CRLF. Bytes after it stay in
        the buffer for the command loop (a pipelined QUIT)."""
        lines = self._lines
        lines.insert_front(b"\r\n")
        lines.high_water = _DATA_HIGH_WATER
        try:
            while True:
                chunk, done = await lines.until(_END, _DATA_CHUNK)
                on_chunk(chunk)
                if done:
                    return
        finally:
            lines.high_water = _COMMAND_HIGH_WATER

    async def _relay(self, envelope: RelayEnvelope, content: bytes, started: float) -> str:
        ctx = self.ctx
        pipeline = ctx.pipeline
        got = await lease.resume(ctx, envelope, self.forwarded_attributes(), "data")
        if isinstance(got, str):
            self._refused(envelope, got, len(content), started)
            return got
        hop = got
        try:
            verdict = await pipeline.decide(content)
        except BaseException:  # cancelled (client gone, shutdown): the lease goes back
            ctx.upstream.recycle(hop)
            raise
        if verdict.classification is None:
            ctx.metrics.classifier_errors.inc()
        refusal = V.reply_for_verdict(verdict)
        outcome: str = verdict.action
        if refusal is not None:
            ctx.upstream.recycle(hop)
            reply = refusal
        else:
            stamped = stamp_pieces(
                content,
                pipeline.stamp_fields(verdict),
                pipeline.our_fields,
                verdict.subject_tag,
            )
            try:
                answer = await hop.data(stamped)
            except BaseException as exc:
                ctx.upstream.release(hop, clean=False)
                if not isinstance(exc, UpstreamError):
                    raise
                reply = lease.upstream_error_reply(ctx, exc, "data")
                outcome = "error"
            else:
                if answer.ok:
                    ctx.upstream.release(hop, clean=True)
                else:
                    ctx.upstream.recycle(hop)  # DATA refused before 354 leaves MAIL open
                    outcome = "error"
                reply = _passthrough(answer)
        self._finish(envelope, content, verdict, outcome, reply, started)
        return reply

    def _refused(self, envelope: RelayEnvelope, reply: str, size: int, started: float) -> None:
        """The transaction line for a message we refused before classifying
        it (size, memory, bare line endings, next hop gone)."""
        outcome = "reject" if reply[:1] == "5" else "tempfail"
        self._finish(envelope, b"", None, outcome, reply, started, size=size)

    def _finish(
        self,
        envelope: RelayEnvelope,
        content: bytes,
        verdict: Verdict | None,
        outcome: str,
        reply: str,
        started: float,
        *,
        size: int | None = None,
    ) -> None:
        self.ctx.pipeline.finish(
            front_end="smtp",
            peer=self.peer_host,
            queue_id=envelope.xforward.get("IDENT") or f"{_QUEUE_PREFIX}.{next(_queue_ids):x}",
            message_id=message_id_of(content) if content else "",
            client_address=self._record_client(envelope),
            sender=envelope.mail_from or "",
            recipients=envelope.rcpt_tos,
            size_bytes=len(content) if size is None else size,
            verdict=verdict,
            outcome=outcome,
            reply_code=V.reply_code(reply),
            started=started,
        )

    def _record_client(self, envelope: RelayEnvelope) -> str:
        addr = envelope.xforward.get("ADDR", "")
        if addr and addr != "[UNAVAILABLE]":
            return addr.removeprefix("IPV6:")
        return self.client_address


_SMTP_COMMANDS = compat.smtp_commands(TriageSMTP)
_PASSTHROUGH: dict[tuple[int, str], str] = {}


def _passthrough(reply: Reply) -> str:
    """verdict.passthrough, remembered: the next hop's MAIL and RCPT replies
    repeat ("250 2.1.0 Ok"); bounded, since final replies carry queue ids."""
    key = (reply.code, reply.message)
    got = _PASSTHROUGH.get(key)
    if got is None:
        got = V.passthrough(reply.code, reply.message)
        if len(_PASSTHROUGH) < 512:
            _PASSTHROUGH[key] = got
    return got


class RelayHandler:
    """aiosmtpd hooks, shared by all sessions of a server."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    async def handle_EHLO(
        self, server: TriageSMTP, session: Session, envelope: RelayEnvelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        out.append("250-ENHANCEDSTATUSCODES")
        if server.xforward_allowed():
            out.append("250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT")
        out.append("250 HELP")
        return out

    async def handle_HELO(
        self, server: TriageSMTP, session: Session, envelope: RelayEnvelope, hostname: str
    ) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: TriageSMTP, session: Session, envelope: RelayEnvelope, address: str, options: list[str]
    ) -> str:
        ctx = self.ctx
        if ctx.draining:
            return V.SHUTTING_DOWN
        if syntax.has_control_characters(address):
            return V.BAD_SENDER
        server.busy = True  # a drain lets the next hop's answer reach the client
        try:
            hop, reply = await lease.open_hop(ctx, server.forwarded_attributes(), address, options)
        finally:
            server.busy = False
        if isinstance(reply, str):
            return reply
        if hop is not None:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            lease.put(envelope, hop, ctx, closed=server.closed)
        return _passthrough(reply)

    async def handle_RCPT(
        self, server: TriageSMTP, session: Session, envelope: RelayEnvelope, address: str, options: list[str]
    ) -> str:
        ctx = self.ctx
        if syntax.has_control_characters(address):
            return V.BAD_RECIPIENT
        if len(envelope.rcpt_tos) >= ctx.settings.server.max_recipients:
            return V.TOO_MANY_RECIPIENTS
        server.busy = True
        try:
            got = await lease.resume(ctx, envelope, server.forwarded_attributes(), "rcpt")
            if isinstance(got, str):
                return got
            hop = got
            try:
                reply = await hop.rcpt(address, options)
            except BaseException as exc:
                ctx.upstream.release(hop, clean=False)
                if not isinstance(exc, UpstreamError):
                    raise
                return lease.upstream_error_reply(ctx, exc, "rcpt")
        finally:
            server.busy = False
        if reply.code == 421:
            ctx.upstream.release(hop, clean=False)  # the next hop is closing this session
        else:
            lease.put(envelope, hop, ctx, closed=server.closed)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            envelope.accepted.append((address, options))
        return _passthrough(reply)

    async def handle_RSET(self, server: TriageSMTP, session: Session, envelope: RelayEnvelope) -> str:
        # aiosmtpd made a fresh envelope before this hook; the old one's
        # lease went back to the pool then (RSET in the background).
        return "250 2.0.0 Ok"
