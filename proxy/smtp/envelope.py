"""One transaction's state, on aiosmtpd's own Envelope, and its next-hop lease.

aiosmtpd makes a fresh envelope (`SMTP._create_envelope`) at HELO/EHLO,
RSET and after DATA; the session hands the old one's next-hop connection
back then, so no path can leak a pool slot.

Before-queue semantics (Postfix SMTPD_PROXY_README): MAIL and each RCPT go
to the next hop as they arrive and the client gets its replies. But a
client that goes quiet inside a transaction must not keep a pooled
connection: `pool_size` such clients would block all mail. So the
connection is a lease. It stays with the transaction while the client
keeps talking; once the client has been idle `upstream.hold_idle_s`
between commands (or while it sends the message body), or at once when the
pool is full and another transaction needs a connection (the longest-idle
lease first), the connection is reset (RSET) and goes back to the pool. A
full pool answers 451 4.3.2 only when every connection is busy with a
command or a message. The next command that needs the
next hop takes a connection again and replays XFORWARD, MAIL and the
recipients the next hop already accepted. If the next hop now answers any
of them differently, the client gets `451 4.3.0` for that command, and the
transaction can only be ended (RSET, or a 451 to DATA): a recipient the
client saw accepted is never silently dropped.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from aiosmtpd.smtp import Envelope

from proxy import verdict as V
from proxy.smtp.client import Reply, UpstreamError
from proxy.smtp.upstream import Hop, PoolFull

if TYPE_CHECKING:
    from proxy.smtp.session import RelayContext

log = structlog.get_logger("triaged.smtp")


class RelayEnvelope(Envelope):
    """aiosmtpd's Envelope plus what relaying needs."""

    def __init__(self) -> None:
        super().__init__()
        self.xforward: dict[str, str] = {}  # XFORWARD attributes for this transaction
        self.accepted: list[tuple[str, list[str]]] = []  # (recipient, options) the next hop took
        self.hop: Hop | None = None  # leased, idle between commands
        self.parked = False  # the lease was given back: replay before the next use
        self.broken = False  # a replay failed: only RSET or a 451 to DATA remain
        self.timer: asyncio.TimerHandle | None = None


def upstream_error_reply(ctx: RelayContext, exc: UpstreamError, stage: str) -> str:
    """Count, log and answer a next-hop failure (always 4xx)."""
    if isinstance(exc, PoolFull):
        ctx.metrics.upstream_errors.labels("pool_full").inc()
        log.warning("upstream_pool_full", stage=stage)
        return V.POOL_FULL
    log.warning("upstream_failed", stage=stage, error=str(exc))
    if stage == "connect":  # no session with the next hop at all
        ctx.metrics.upstream_errors.labels("connect").inc()
        return V.UPSTREAM_UNREACHABLE
    ctx.metrics.upstream_errors.labels("timeout" if exc.timeout else "failed").inc()
    return V.UPSTREAM_TIMEOUT if exc.timeout else V.UPSTREAM_FAILED


class IdleLeases:
    """Transactions holding a connection between commands, oldest first:
    the ones a full pool takes a connection back from."""

    def __init__(self) -> None:
        self._envs: dict[RelayEnvelope, None] = {}

    def add(self, env: RelayEnvelope) -> None:
        self._envs[env] = None

    def discard(self, env: RelayEnvelope) -> None:
        self._envs.pop(env, None)

    def oldest(self) -> RelayEnvelope | None:
        return next(iter(self._envs), None)


def take(env: RelayEnvelope, ctx: RelayContext) -> Hop | None:
    """The leased connection, detached for a command: nothing parks it meanwhile."""
    if env.timer is not None:
        env.timer.cancel()
        env.timer = None
    ctx.idle_leases.discard(env)
    hop, env.hop = env.hop, None
    return hop


def put(env: RelayEnvelope, hop: Hop, ctx: RelayContext, *, closed: bool) -> None:
    """Back to the transaction after a command, or to the pool when the
    transaction is gone (`closed`: the client left meanwhile)."""
    if closed:
        ctx.upstream.recycle(hop)
        return
    env.hop = hop
    ctx.idle_leases.add(env)
    loop = asyncio.get_running_loop()
    env.timer = loop.call_later(ctx.settings.upstream.hold_idle_s, park, env, ctx)


def park(env: RelayEnvelope, ctx: RelayContext) -> None:
    """The client is idle: the connection goes back to the pool."""
    hop = take(env, ctx)
    if hop is not None:
        env.parked = True
        ctx.upstream.recycle(hop)
        ctx.metrics.upstream_leases_returned.labels("idle").inc()
        log.info("upstream_lease_returned", reason="client idle", rcpts=len(env.accepted))


async def _acquire(ctx: RelayContext, *, fresh: bool) -> Hop:
    """A connection from the pool; when it is full, the one the longest-idle
    transaction holds (reset with RSET, that transaction replays later).
    PoolFull only when every connection is busy with a command or a message."""
    try:
        return await ctx.upstream.acquire(fresh=fresh)
    except PoolFull:
        while (victim := ctx.idle_leases.oldest()) is not None:
            hop = take(victim, ctx)
            if hop is None:
                continue
            victim.parked = True
            ctx.metrics.upstream_leases_returned.labels("pool_full").inc()
            log.info("upstream_lease_returned", reason="pool full", rcpts=len(victim.accepted))
            try:
                clean = await hop.rset()
            except BaseException:  # cancelled: the slot comes back
                ctx.upstream.release(hop, clean=False)
                raise
            if clean:
                hop.reused = True  # a stale connection is retried once, fresh
                return hop
            ctx.upstream.release(hop, clean=False)  # its slot is free now
            return await ctx.upstream.acquire(fresh=True)
        raise


def end(env: RelayEnvelope, ctx: RelayContext) -> None:
    """The transaction is over (RSET, HELO, end of DATA, connection lost)."""
    hop = take(env, ctx)
    if hop is not None:
        ctx.upstream.recycle(hop)


async def open_hop(
    ctx: RelayContext, attrs: dict[str, str], sender: str, options: list[str]
) -> tuple[Hop | None, Reply | str]:
    """A connection with MAIL sent: (hop, the next hop's reply), or
    (None, our 4xx). A pooled connection the next hop had closed is
    retried once on a fresh one."""
    for attempt in (1, 2):
        try:
            hop = await _acquire(ctx, fresh=attempt == 2)
        except UpstreamError as exc:
            return None, upstream_error_reply(ctx, exc, "connect")
        try:
            forward = attrs if ctx.settings.upstream.xforward and "XFORWARD" in hop.extensions else None
            reply = await hop.mail(sender, offered(options, hop.extensions), forward)
        except BaseException as exc:
            ctx.upstream.release(hop, clean=False)  # cancelled too: the slot comes back
            if not isinstance(exc, UpstreamError):
                raise
            if attempt == 1 and hop.reused and not exc.timeout:
                continue
            return None, upstream_error_reply(ctx, exc, "mail")
        if not reply.ok:
            # No transaction was opened; a 421 means the next hop is closing.
            ctx.upstream.release(hop, clean=reply.code != 421)
            return None, reply
        return hop, reply
    raise AssertionError("unreachable")


async def resume(ctx: RelayContext, env: RelayEnvelope, attrs: dict[str, str], stage: str) -> Hop | str:
    """The transaction's connection: the leased one, or, after a park, a new
    one with MAIL and the accepted RCPTs replayed. A string is the 4xx to
    answer instead."""
    if env.broken:
        return V.TRANSACTION_LOST
    hop = take(env, ctx)
    if hop is not None:
        return hop
    if not env.parked:
        return V.UPSTREAM_FAILED  # the next hop failed earlier in this transaction
    hop, reply = await open_hop(ctx, attrs, env.mail_from or "", env.mail_options)
    if hop is None:
        return reply if isinstance(reply, str) else _lost(env, stage, reply)
    try:
        for rcpt, options in env.accepted:
            answer = await hop.rcpt(rcpt, options)
            if not answer.ok:
                ctx.upstream.recycle(hop)
                return _lost(env, stage, answer)
    except BaseException as exc:
        ctx.upstream.release(hop, clean=False)
        if not isinstance(exc, UpstreamError):
            raise
        return upstream_error_reply(ctx, exc, stage)
    env.parked = False
    return hop


def _lost(env: RelayEnvelope, stage: str, reply: Reply) -> str:
    env.broken = True
    log.warning("upstream_replay_refused", stage=stage, reply=reply.code)
    return V.TRANSACTION_LOST


def offered(options: list[str], extensions: dict[str, str]) -> list[str]:
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
