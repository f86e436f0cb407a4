"""The client-facing SMTP session: aiosmtpd, with real before-queue proxy
semantics (Postfix SMTPD_PROXY_README).

MAIL and each RCPT are forwarded to the next hop as they arrive and its reply
goes back verbatim; at the end of DATA the message is classified, stamped,
sent, and the client gets the next hop's final reply. Any failure of ours or
of the next hop's transport is a 4xx: the client keeps the mail.

aiosmtpd's handler hooks cover MAIL/RCPT/RSET/EHLO. DATA is overridden: we
read the message in large chunks (not line by line), without a line-length
limit (the relay must be byte-exact), with SIZE enforced after reading
(RFC 5321 4.5.3.1.10) and a global bound on buffered bytes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import re
import ssl
import time
from collections.abc import Sequence
from itertools import count
from typing import Any, cast

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from proxy import verdict as V
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline, message_id_of
from proxy.proxyproto import ProxyError, ProxyHeader, parse
from proxy.settings import ListenerSettings, Settings
from proxy.smtp.client import UpstreamError
from proxy.smtp.stamp import stamp_pieces
from proxy.smtp.upstream import Hop, Upstream

log = structlog.get_logger("triaged.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# "<local@domain>" with dot-atom text only (RFC 5321 4.1.2), then parameters.
_PLAIN_PATH = re.compile(r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)>(.*)$", re.S)
_DATA_CHUNK = 1 << 20  # read DATA in pieces of up to 1 MiB
_PROXY_TIMEOUT_S = 10.0
_XFORWARD_ATTRS = frozenset({"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"})
_QUEUE_PREFIX = f"{os.getpid():x}"
_queue_ids = count(1)


def _networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _allowed(address: str, nets: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


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
        self.allowed = _networks(settings.server.allowed_clients)
        self.xforward_clients = _networks(settings.server.xforward_clients)
        self.connections: set[TriageSMTP] = set()
        self.inflight_bytes = 0
        self.draining = False
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


class TriageSMTP(SMTP):
    """One client connection."""

    def __init__(self, ctx: RelayContext, listener: ListenerSettings) -> None:
        # SMTP.__init__ introspects the handler and itself (inspect.getmembers,
        # dir, signature) on every connection: about 160 us, a fifth of the
        # relay's CPU per message. We set the same attributes from tables
        # built once; tests/test_proxy_codec.py checks none is missing.
        s = ctx.settings.server
        loop = asyncio.get_running_loop()
        self.__ident__ = "ESMTP triaged"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = ctx.handler
        self.data_size_limit = s.max_message_bytes
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = s.hostname
        self.tls_context = ctx.tls_context
        self.require_starttls = False
        self._timeout_duration = s.idle_timeout_s
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None  # PROXY is parsed by proxy/proxyproto.py
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}  # no AUTH: a relay for trusted MTAs
        self._handle_hooks = ctx.hooks
        self._ehlo_hook_ver = "new"
        self._smtp_methods = {name: getattr(self, attr) for name, attr in _SMTP_COMMANDS}
        self._enforce_call_limit = False
        self.ctx = ctx
        self.listener = listener
        self.hop: Hop | None = None
        self.xforward: dict[str, str] = {}
        self.proxy: ProxyHeader | None = None
        self.peer_host = ""
        self.client_address = ""
        self.in_data = False
        self.reserved = 0  # bytes of this session's DATA counted in ctx.inflight_bytes
        self._in_ehlo = False
        self._rejected = False
        self.busy = False  # a command is waiting for the next hop

    # -- connection life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:  # STARTTLS: same connection
            super().connection_made(transport)
            return
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        self.peer_host = self.client_address = str(peer[0]) if peer else ""
        refusal = None
        if ctx.draining:
            refusal = V.SHUTTING_DOWN
        elif len(ctx.connections) >= ctx.settings.server.max_connections:
            refusal = V.TOO_MANY_CONNECTIONS
            ctx.metrics.connections.labels("too_many").inc()
        elif not self.listener.proxy_protocol and not _allowed(self.peer_host, ctx.allowed):
            # Behind PROXY the allowlist applies to the real client, later.
            refusal = V.GREETING_DENIED
            ctx.metrics.connections.labels("denied").inc()
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
        ctx.metrics.connections.labels("accepted").inc()
        ctx.metrics.connections_open.set(len(ctx.connections))
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._rejected:
            return
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.metrics.connections_open.set(len(ctx.connections))
        self.abort_hop()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        log.info("client_timeout", peer=self.peer_host, in_data=self.in_data)
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        try:
            if self.listener.proxy_protocol and not await self._read_proxy_header():
                return
            await super()._handle_client()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer

    async def _read_proxy_header(self) -> bool:
        buf = b""
        try:
            async with asyncio.timeout(_PROXY_TIMEOUT_S):
                while True:
                    result = parse(buf)
                    if not isinstance(result, int):
                        break
                    if buf.startswith(b"PROXY") or (buf[:1] == b"P" and result == 1):
                        buf += await self._reader.readuntil(b"\n")
                    else:
                        buf += await self._reader.readexactly(result)
        except (ProxyError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            log.warning("proxy_header_invalid", peer=self.peer_host, error=type(exc).__name__)
            self._close()
            return False
        header, _used = result
        self.proxy = header
        if header.source is not None:
            # A LOCAL header (HAProxy health check) keeps the real peer and
            # goes on as a normal session (proxy-protocol.txt 2.2).
            self.client_address = header.source[0]
        if not _allowed(self.client_address, self.ctx.allowed):
            self.ctx.metrics.connections.labels("denied").inc()
            await self.push(V.GREETING_DENIED)
            self._close()
            return False
        return True

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Drain: close the session now with 421 (RFC 5321 3.8).

        Written through the StreamWriter, which also follows a STARTTLS
        switch; the transport is closed, so nothing the client still sends
        (the rest of a message body) is ever read as commands.
        """
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(V.SHUTTING_DOWN.encode() + b"\r\n")
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
        if isinstance(status, str) and not self._in_ehlo and "\r\n" not in status:
            status = V.with_enhanced(status)
        await super().push(status)
        if self.ctx.draining and not self._in_ehlo and self.idle and status[:3] != "221":
            # Draining: the command this answered was the last (RFC 5321 3.8).
            self.shutdown()

    async def handle_exception(self, error: Exception) -> str:
        log.exception("session_error", peer=self.peer_host, error=type(error).__name__)
        return V.INTERNAL_ERROR

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False
        if self.ctx.draining and self.idle:
            self.shutdown()

    # -- transaction state -------------------------------------------------

    def abort_hop(self) -> None:
        """End the upstream side of an unfinished transaction."""
        hop, self.hop = self.hop, None
        if hop is not None:
            self.ctx.upstream.release(hop, clean=False)

    async def reset_hop(self) -> None:
        hop, self.hop = self.hop, None
        if hop is not None:
            clean = False
            try:
                clean = await hop.rset()
            finally:  # also when the client vanished mid-RSET: the pool slot comes back
                self.ctx.upstream.release(hop, clean=clean)

    # -- XFORWARD (Postfix XFORWARD_README) --------------------------------

    def xforward_allowed(self) -> bool:
        return _allowed(self.client_address, self.ctx.xforward_clients)

    def forwarded_attributes(self) -> dict[str, str]:
        """What the next hop should log as the client: the XFORWARD our
        client sent, else the real client from a PROXY header (behind HAProxy
        the TCP peer is only the balancer)."""
        if self.xforward:
            return self.xforward
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
            if not eq or name not in _XFORWARD_ATTRS:
                await self.push(V.XFORWARD_BAD)
                return
            attrs[name] = value
        if not attrs:
            await self.push(V.XFORWARD_BAD)
            return
        self.xforward.update(attrs)
        await self.push(V.XFORWARD_OK)

    # -- DATA ----------------------------------------------------------------

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.hop is None:  # the next hop failed during RCPT
            await self.push(V.UPSTREAM_FAILED)
            return
        ctx = self.ctx
        if ctx.inflight_bytes >= ctx.settings.server.max_inflight_data_bytes:
            await self.push(V.INSUFFICIENT_MEMORY)
            return
        started = time.perf_counter()
        self.in_data = True
        self._reset_timeout(ctx.settings.server.data_timeout_s)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                content, refusal = await self._read_data()
            except Exception as exc:
                # Where the body ends is unknown now: answering and reading
                # on would take the rest of it as commands. Close instead.
                log.error("data_read_failed", peer=self.peer_host, error=type(exc).__name__)
                self._writer.write(V.DATA_READ_FAILED.encode() + b"\r\n")
                self._close()
                return
            self._reset_timeout()
            if refusal is not None:
                await self.reset_hop()
                await self.push(refusal)
                return
            assert content is not None
            reply = await self._relay(content, started)
            await self.push(reply)
        finally:
            self.in_data = False
            # Also on a client hanging up mid-DATA: what was reserved comes back.
            ctx.unreserve(self.reserved)
            self.reserved = 0
            ctx.metrics.inflight_bytes.set(ctx.inflight_bytes)
            self.abort_hop()  # no-op when the transaction ended cleanly
            self.xforward = {}
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            if ctx.draining:
                self.shutdown()

    async def _read_data(self) -> tuple[bytes | None, str | None]:
        """The unstuffed message, or a refusal. Bytes held are in self.reserved.

        A CRLF is put in front of the buffered data so the end marker is
        always CRLF "." CRLF, even for an empty message, and dot-unstuffing
        (RFC 5321 4.5.2) is one bytes.replace over the whole message.
        """
        ctx = self.ctx
        limit = ctx.settings.server.max_message_bytes
        reader = self._reader
        buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
        buffer[0:0] = b"\r\n"
        old_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = _DATA_CHUNK  # type: ignore[attr-defined]
        parts: list[bytes] = []
        size = 0
        refusal: str | None = None
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b"\r\n.\r\n")
                    last = True
                except asyncio.LimitOverrunError as exc:
                    chunk = await reader.readexactly(exc.consumed)
                    last = False
                size += len(chunk)
                if refusal is None:
                    if size > limit + 5:  # the CRLF we added and ".CRLF"
                        refusal = V.MESSAGE_TOO_BIG
                    elif not ctx.reserve(len(chunk)):
                        refusal = V.INSUFFICIENT_MEMORY
                    else:
                        self.reserved += len(chunk)
                        parts.append(chunk)
                    if refusal is not None:  # keep reading, hold nothing
                        parts.clear()
                        ctx.unreserve(self.reserved)
                        self.reserved = 0
                if last:
                    break
        finally:
            reader._limit = old_limit  # type: ignore[attr-defined]
        if refusal is not None:
            return None, refusal
        ctx.metrics.inflight_bytes.set(ctx.inflight_bytes)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if b"\r\n.." in data:
            data = data.replace(b"\r\n..", b"\r\n.")
        return data[2:-3], None

    async def _relay(self, content: bytes, started: float) -> str:
        ctx = self.ctx
        pipeline = ctx.pipeline
        envelope = self.envelope
        assert envelope is not None and self.hop is not None
        verdict = await pipeline.decide(content)
        if verdict.classification is None:
            ctx.metrics.classifier_errors.inc()
        refusal = V.reply_for_verdict(verdict)
        outcome: str = verdict.action
        if refusal is not None:
            await self.reset_hop()
            reply = refusal
        else:
            stamped = stamp_pieces(
                content,
                pipeline.stamp_fields(verdict),
                pipeline.our_fields,
                verdict.subject_tag,
            )
            hop = self.hop
            try:
                answer = await hop.data(stamped)
            except UpstreamError as exc:
                self.abort_hop()
                ctx.metrics.upstream_errors.labels("timeout" if exc.timeout else "failed").inc()
                log.warning("upstream_failed", stage="data", error=str(exc))
                reply = V.UPSTREAM_TIMEOUT if exc.timeout else V.UPSTREAM_FAILED
                outcome = "error"
            else:
                if answer.ok:
                    self.hop = None
                    ctx.upstream.release(hop, clean=True)
                else:
                    await self.reset_hop()  # DATA refused before 354 leaves MAIL open
                    outcome = "error"
                reply = V.passthrough(answer.code, answer.message)
        pipeline.finish(
            front_end="smtp",
            peer=self.peer_host,
            queue_id=self.xforward.get("IDENT") or f"{_QUEUE_PREFIX}.{next(_queue_ids):x}",
            message_id=message_id_of(content),
            client_address=self._record_client(),
            sender=envelope.mail_from or "",
            recipients=envelope.rcpt_tos,
            size_bytes=len(content),
            verdict=verdict,
            outcome=outcome,
            reply_code=V.reply_code(reply),
            started=started,
        )
        return reply

    def _record_client(self) -> str:
        addr = self.xforward.get("ADDR", "")
        if addr and addr != "[UNAVAILABLE]":
            return addr.removeprefix("IPV6:")
        return self.client_address


# (command, method name) of every smtp_* verb; AUTH is not offered.
_SMTP_COMMANDS = tuple(
    (m[5:], m) for m in dir(TriageSMTP) if m.startswith("smtp_") and m != "smtp_AUTH"
)


class RelayHandler:
    """aiosmtpd hooks, shared by all sessions of a server."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    async def handle_EHLO(
        self, server: TriageSMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        server.abort_hop()
        server.xforward = {}
        session.host_name = hostname
        out = [r for r in responses[:-1] if not r.startswith("250-AUTH")]
        out.append("250-ENHANCEDSTATUSCODES")
        if server.xforward_allowed():
            out.append("250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT")
        out.append("250 HELP")
        return out

    async def handle_HELO(
        self, server: TriageSMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        server.abort_hop()
        server.xforward = {}
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: TriageSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        server.busy = True  # a drain lets the next hop's answer reach the client
        try:
            return await self._mail(server, envelope, address, options)
        finally:
            server.busy = False

    async def _mail(
        self, server: TriageSMTP, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        ctx = self.ctx
        if ctx.draining:
            return V.SHUTTING_DOWN
        for attempt in (1, 2):
            try:
                hop = await ctx.upstream.acquire(fresh=attempt == 2)
            except UpstreamError as exc:
                ctx.metrics.upstream_errors.labels("connect").inc()
                log.warning("upstream_failed", stage="connect", error=str(exc))
                return V.UPSTREAM_UNREACHABLE
            try:
                attrs = server.forwarded_attributes()
                if attrs and ctx.settings.upstream.xforward and "XFORWARD" in hop.extensions:
                    await hop.xforward(attrs)
                reply = await hop.mail(address, _offered(options, hop.extensions))
                break
            except BaseException as exc:
                ctx.upstream.release(hop, clean=False)  # cancelled too: the slot comes back
                if not isinstance(exc, UpstreamError):
                    raise
                if attempt == 1 and hop.reused and not exc.timeout:
                    continue  # a pooled connection the next hop had closed: once more, fresh
                ctx.metrics.upstream_errors.labels("timeout" if exc.timeout else "failed").inc()
                log.warning("upstream_failed", stage="mail", error=str(exc))
                return V.UPSTREAM_TIMEOUT if exc.timeout else V.UPSTREAM_FAILED
        if not reply.ok:
            # No transaction was opened; a 421 means the next hop is closing.
            ctx.upstream.release(hop, clean=reply.code != 421)
        else:
            server.hop = hop
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return V.passthrough(reply.code, reply.message)

    async def handle_RCPT(
        self, server: TriageSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        server.busy = True  # a drain lets the next hop's answer reach the client
        try:
            return await self._rcpt(server, envelope, address, options)
        finally:
            server.busy = False

    async def _rcpt(
        self, server: TriageSMTP, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        ctx = self.ctx
        if len(envelope.rcpt_tos) >= ctx.settings.server.max_recipients:
            return V.TOO_MANY_RECIPIENTS
        hop = server.hop
        if hop is None:
            return V.UPSTREAM_FAILED
        try:
            reply = await hop.rcpt(address, options)
        except UpstreamError as exc:
            server.abort_hop()
            ctx.metrics.upstream_errors.labels("timeout" if exc.timeout else "failed").inc()
            log.warning("upstream_failed", stage="rcpt", error=str(exc))
            return V.UPSTREAM_TIMEOUT if exc.timeout else V.UPSTREAM_FAILED
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        elif reply.code == 421:
            server.abort_hop()  # the next hop is closing this session
        return V.passthrough(reply.code, reply.message)

    async def handle_RSET(self, server: TriageSMTP, session: Session, envelope: Envelope) -> str:
        server.busy = True
        try:
            await server.reset_hop()
        finally:
            server.busy = False
        server.xforward = {}
        return "250 2.0.0 Ok"


def _offered(options: list[str], extensions: dict[str, str]) -> list[str]:
    """MAIL parameters the next hop advertised; others are dropped."""
    out = []
    for opt in options:
        key = opt.partition("=")[0]
        if (
            (key == "SIZE" and "SIZE" in extensions)
            or (key == "BODY" and "8BITMIME" in extensions)
            or (key == "SMTPUTF8" and "SMTPUTF8" in extensions)
        ):
            out.append(opt)
    return out
