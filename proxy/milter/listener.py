"""The asyncio side of the milter front end: it only moves bytes.

One task per MTA connection (Postfix opens one per SMTP session, and one per
cleanup run for non_smtpd_milters), several messages per connection. The
protocol is proxy/milter/protocol.py; the message goes through the shared
pipeline (same classifier and micro-batcher as SMTP) at its end, and
proxy/verdict.py turns the verdict into milter actions.

Deadlines per stage: negotiation and the wait between messages use
server.idle_timeout_s; once a message has started, each read uses
server.data_timeout_s; the answer at end of message is bounded by the
classifier's deadline inside Pipeline.decide. A peer that breaks the
protocol, sends a truncated packet or times out is closed with one log line;
Postfix then applies milter_default_action.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from classifier.addresses import Networks
from proxy import verdict as V
from proxy.metrics import Metrics
from proxy.milter import codec as c
from proxy.milter.message import Budget, MessageBuilder
from proxy.milter.protocol import Event, MilterProtocol
from proxy.pipeline import Pipeline
from proxy.settings import ListenerSettings, Settings, listener_address

log = structlog.get_logger("triaged.milter")

_READ = 1 << 17  # Postfix body chunks are up to 64 KiB


class MilterContext:
    """What every milter connection of one server shares."""

    def __init__(self, settings: Settings, pipeline: Pipeline, budget: Budget, metrics: Metrics) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.budget = budget
        self.metrics = metrics
        self.connections: set[MilterConnection] = set()
        self.draining = False
        # TCP peers must be in server.allowed_clients, like SMTP clients.
        self.allowed = Networks(settings.server.allowed_clients)

    def allows(self, address: str) -> bool:
        return address in self.allowed


class MilterConnection:
    def __init__(
        self, ctx: MilterContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.proto = MilterProtocol()
        self.message = MessageBuilder(
            ctx.budget, ctx.settings.server.max_message_bytes, leading_space=False
        )
        self.started = 0.0  # perf_counter at the message's first step
        self.task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        """In the middle of a message: a drain lets it finish."""
        return self.message.active or self.proto.awaiting_eom_reply

    async def run(self) -> None:
        s = self.ctx.settings.server
        negotiated = False
        quickack = _quickack_socket(self.writer)
        try:
            while not self.proto.closed:
                stage = "message" if self.busy else "idle"
                try:
                    async with asyncio.timeout(s.data_timeout_s if self.busy else s.idle_timeout_s):
                        data = await self.reader.read(_READ)
                except TimeoutError:
                    log.warning("milter_timeout", peer=self.peer, stage=stage)
                    return
                if quickack is not None and data:
                    quickack = _quickack(quickack)
                if not data:
                    if self.proto.pending or self.busy:
                        log.warning("milter_closed_mid_message", peer=self.peer,
                                    truncated_packet=self.proto.pending)
                    return
                try:
                    events = self.proto.receive(data)
                    if not negotiated and self.proto.negotiated:
                        negotiated = True
                        log.debug("milter_negotiated", peer=self.peer,
                                  actions=hex(self.proto.actions), protocol=hex(self.proto.protocol))
                    await self._handle(events)
                    self.proto.raise_error()
                except c.ProtocolError as exc:
                    log.warning("milter_protocol_error", peer=self.peer, error=str(exc))
                    return
                if self.ctx.draining and not self.busy:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the MTA went away; it applies milter_default_action
        finally:
            self.message.reset()
            self.ctx.metrics.inflight_bytes.set(self.ctx.budget.inflight_bytes)
            self.writer.close()

    async def _flush(self) -> None:
        out = self.proto.data_to_send()
        if out:
            self.writer.write(out)
            async with asyncio.timeout(self.ctx.settings.server.data_timeout_s):
                await self.writer.drain()

    async def _handle(self, events: list[Event]) -> None:
        msg = self.message
        while True:
            eom = False
            for ev in events:
                if isinstance(ev, c.Header):
                    self._begin()
                    msg.add_header(ev.name, ev.value)
                elif isinstance(ev, c.Body):
                    self._begin()
                    msg.add_body(ev.chunk)
                elif isinstance(ev, c.Macros):
                    self._begin()
                    msg.macros.update(ev.values)
                elif isinstance(ev, c.Mail):
                    self._begin()
                    msg.sender = ev.args[0].strip("<>") if ev.args else ""
                elif isinstance(ev, c.Rcpt):
                    self._begin()
                    if ev.args:
                        msg.recipients.append(ev.args[0].strip("<>"))
                elif isinstance(ev, c.EndOfMessage):
                    if ev.chunk:
                        msg.add_body(ev.chunk)
                    eom = True
                elif isinstance(ev, c.Abort | c.Quit):
                    msg.reset()
            if not eom:
                await self._flush()
                return
            await self._flush()  # answers that preceded the end of message
            self._begin()
            try:
                mods, reply, outcome, verdict = await self._decide()
            except Exception as exc:  # a bug of ours: 451, never its text
                log.exception("milter_error", peer=self.peer, error=type(exc).__name__)
                mods, reply, outcome, verdict = [], c.ReplyCode(V.INTERNAL_ERROR), "error", None
            self._finish(reply, outcome, verdict)
            try:
                events = self.proto.reply_end_of_message(mods, reply)
            finally:
                await self._flush()  # the answer goes out even if what follows it is garbage
            if not events:
                return

    def _begin(self) -> None:
        if not self.message.active:
            self.message.active = True
            self.started = time.perf_counter()
            # Negotiation is over by the first message: do values carry their leading space?
            self.message.leading_space = self.proto.leading_space

    async def _decide(self) -> tuple[list[c.Modification], c.Reply, str, V.Verdict | None]:
        msg = self.message
        ctx = self.ctx
        ctx.metrics.inflight_bytes.set(ctx.budget.inflight_bytes)
        if msg.refusal is not None:
            return [], c.ReplyCode(msg.refusal), "error", None
        pipeline = ctx.pipeline
        verdict = await pipeline.decide(msg.raw())
        if verdict.classification is None:
            ctx.metrics.classifier_errors.inc()
        mods, reply = V.milter_response(
            verdict,
            pipeline.stamp_fields(verdict),
            msg.headers,
            pipeline.our_fields,
            leading_space=self.proto.leading_space,
        )
        allowed = [m for m in mods if self.proto.allows(m)]
        if len(allowed) != len(mods):
            # The MTA did not agree to these actions (e.g. no quarantine offered).
            log.warning("milter_action_not_negotiated", peer=self.peer,
                        dropped=sorted({type(m).__name__ for m in mods if m not in allowed}))
        return allowed, reply, verdict.action, verdict

    def _finish(self, reply: c.Reply, outcome: str, verdict: V.Verdict | None) -> None:
        msg = self.message
        code = V.reply_code(reply.text) if isinstance(reply, c.ReplyCode) else 250
        self.ctx.pipeline.finish(
            front_end="milter",
            peer=self.peer,
            queue_id=msg.macros.get("i", ""),
            message_id=msg.message_id(),
            client_address=msg.macros.get("{client_addr}", ""),
            sender=msg.sender,
            recipients=msg.recipients,
            size_bytes=msg.size,
            verdict=verdict,
            outcome=outcome,
            reply_code=code,
            started=self.started,
        )
        msg.reset()


def _quickack_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    """The TCP socket to keep in quick-ACK mode, or None (unix sockets, no Linux).

    Why: with the NR_* flags we never answer MAIL, RCPT, headers or body, so
    no reply carries an ACK for them; Postfix writes those steps as small
    segments, Nagle on its side holds the next write until the last one is
    ACKed, and Linux delays our ACK up to 40 ms. Measured with Postfix 3.7 and
    smtp-source -s 20: the header burst after RCPT waited 43 ms at the median;
    ACKing at once (TCP_QUICKACK, re-armed after each read because the kernel
    clears it) brought that to about 6 ms.
    """
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_QUICKACK"):
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return _quickack(sock)


def _quickack(sock: socket.socket) -> socket.socket | None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        return None  # not supported here: leave the kernel's default
    return sock


class MilterListener:
    """One `inet:host:port` or `unix:/path` milter socket."""

    def __init__(
        self, ctx: MilterContext, listener: ListenerSettings, *, sockets: Sequence[socket.socket] | None = None
    ) -> None:
        self.ctx = ctx
        self.listener = listener
        # Inherited from the supervisor (proxy/worker.py): serve on these; the
        # supervisor owns a unix: socket's file, so close() leaves it alone.
        self._inherited = sockets
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | str = ""

    async def start(self) -> None:
        where = listener_address(self.listener)
        if self._inherited is not None:
            sock = self._inherited[0]
            if sock.family == socket.AF_UNIX:
                self._server = await asyncio.start_unix_server(self._accept, sock=sock, limit=c.MAX_PACKET)
            else:
                self._server = await asyncio.start_server(self._accept, sock=sock, limit=c.MAX_PACKET)
            self.address = where if isinstance(where, str) else _tcp_address(sock)
        elif isinstance(where, str):
            self._server = await _start_unix(self._accept, where, self.listener)
            self.address = where
        else:
            host, port = where
            self._server = await asyncio.start_server(
                self._accept, host, port, reuse_address=True, backlog=1024, limit=c.MAX_PACKET
            )
            self.address = _tcp_address(self._server.sockets[0])
        log.info("milter_listening", address=self.describe())

    def describe(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        return f"inet:{self.address[0]}:{self.address[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = str(peer_info[0]) if isinstance(peer_info, tuple) else "unix"
        ctx = self.ctx
        if isinstance(peer_info, tuple) and not ctx.allows(peer):
            log.warning("milter_connection_denied", peer=peer)
            writer.close()
            return
        if ctx.draining or len(ctx.connections) >= ctx.settings.server.max_connections:
            # Closing before negotiation: the MTA applies milter_default_action.
            log.info("milter_connection_refused", peer=peer, draining=ctx.draining)
            writer.close()
            return
        conn = MilterConnection(ctx, reader, writer, peer)
        conn.task = asyncio.current_task()
        ctx.connections.add(conn)
        try:
            await conn.run()
        finally:
            ctx.connections.discard(conn)

    def close(self) -> None:
        """Stop accepting; open connections go on (see drain)."""
        if self._server is not None:
            self._server.close()
        if isinstance(self.address, str) and self.address and self._inherited is None:
            try:
                os.unlink(self.address)
            except OSError:
                pass

    async def wait_closed(self) -> None:
        if self._server is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                pass


async def drain_milter(ctx: MilterContext, timeout_s: float) -> None:
    """SIGTERM: close idle connections now, let open messages finish, then close the rest."""
    ctx.draining = True
    for conn in list(ctx.connections):
        if not conn.busy and conn.task is not None:
            conn.task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while any(conn.busy for conn in ctx.connections) and loop.time() < deadline:  # noqa: ASYNC110 - polled, bounded
        await asyncio.sleep(0.05)
    tasks = [conn.task for conn in ctx.connections if conn.task is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _start_unix(
    cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    path: str,
    listener: ListenerSettings,
) -> asyncio.Server:
    return await asyncio.start_unix_server(cb, sock=bind_unix(path, listener), limit=c.MAX_PACKET)


def bind_unix(path: str, listener: ListenerSettings) -> socket.socket:
    """A listening unix socket with the configured mode and owner (Postfix's
    smtpd runs as `postfix` and must be able to connect). A stale socket file
    is replaced. Also used by the supervisor, which binds for its workers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    except FileNotFoundError:
        pass
    except OSError:
        os.unlink(path)  # nobody listens on it: left over from a crash
    else:
        raise OSError(f"{path}: another process is listening on it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1024)
        os.chmod(path, int(listener.socket_mode, 8))
        if listener.socket_owner:
            user, _, group = listener.socket_owner.partition(":")
            try:
                uid = pwd.getpwnam(user).pw_uid if user else -1
                gid = grp.getgrnam(group).gr_gid if group else -1
            except KeyError:
                raise OSError(
                    f"{path}: socket_owner {listener.socket_owner!r}: no such user or group"
                ) from None
            os.chown(path, uid, gid)
    except BaseException:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    sock.setblocking(False)
    return sock


def _tcp_address(sock: Any) -> tuple[str, int]:
    # a socket.socket or asyncio's TransportSocket
    bound = sock.getsockname()
    return (str(bound[0]), int(bound[1]))


def milter_listeners(settings: Settings) -> Sequence[ListenerSettings]:
    return [x for x in settings.server.listeners if x.protocol == "milter"]
