"""The next hop: a bounded pool of SMTP connections, or a Maildir.

Both hand out a `Hop` per transaction with the same verbs, so the session
code does not care where mail goes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Coroutine, Mapping, Sequence
from itertools import count
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

from proxy.settings import UpstreamSettings
from proxy.smtp.client import Reply, SmtpClient, UpstreamError
from proxy.smtp.dotstuff import Piece

log = structlog.get_logger("triaged.upstream")

# A pooled connection idle longer than this is probed with NOOP before reuse.
_PROBE_AFTER_S = 2.0


class Hop(Protocol):
    extensions: dict[str, str]
    reused: bool  # came from the pool idle list (may be stale)

    # MAIL, after XFORWARD of the attributes in `xforward` the hop offers.
    async def mail(
        self, sender: str, options: list[str], xforward: Mapping[str, str] | None = None
    ) -> Reply: ...
    async def rcpt(self, recipient: str, options: list[str]) -> Reply: ...
    async def data(self, pieces: Sequence[Piece]) -> Reply: ...
    async def rset(self) -> bool: ...


class Upstream(Protocol):
    async def start(self) -> None: ...
    async def acquire(self, *, fresh: bool = False) -> Hop: ...
    def release(self, hop: Hop, *, clean: bool) -> None: ...
    def recycle(self, hop: Hop) -> None: ...
    async def close(self) -> None: ...


class PoolFull(UpstreamError):
    """Every pooled connection is in use: answered at once, never waited for
    (DESIGN.md 4: a full queue answers 451 4.3.2 at once)."""

    def __init__(self) -> None:
        super().__init__("connection pool full", connect=True)


def build_upstream(settings: UpstreamSettings, helo_name: str) -> Upstream:
    url = settings.url
    if url.startswith("maildir:"):
        return MaildirUpstream(Path(url.removeprefix("maildir:")))
    parts = urlsplit(url)
    if parts.scheme == "smtp" and parts.hostname and parts.port:
        return SmtpPool(settings, parts.hostname, parts.port, helo_name)
    raise ValueError(f"upstream.url: unsupported {url!r}")


class SmtpPool:
    """Bounded pool: at most pool_size connections, idle ones reused LIFO."""

    def __init__(self, settings: UpstreamSettings, host: str, port: int, helo_name: str) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.helo_name = helo_name
        self.in_use = 0  # connections handed out or being reset (RSET) for reuse
        self._idle: list[SmtpClient] = []
        self._tasks: set[asyncio.Task[None]] = set()  # RSETs and QUITs in the background
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def start(self) -> None:
        if self.settings.starttls != "none":
            self._tls = ssl.create_default_context()
            if self.settings.starttls == "opportunistic":
                # Opportunistic TLS (RFC 7435): encrypt, do not authenticate.
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    async def acquire(self, *, fresh: bool = False) -> SmtpClient:
        """A connection at a transaction boundary; `fresh`: skip idle ones."""
        s = self.settings
        if self.in_use >= s.pool_size or self._closed:
            raise PoolFull
        self.in_use += 1
        try:
            now = time.monotonic()
            while self._idle and not fresh:
                client = self._idle.pop()
                idle = now - client.last_used
                if not client.usable or idle > s.max_idle_s:
                    client.close()
                    continue
                if idle > _PROBE_AFTER_S and not await client.noop():
                    client.close()
                    continue
                client.reused = True
                return client
            return await SmtpClient.connect(
                self.host,
                self.port,
                helo_name=self.helo_name,
                connect_timeout_s=s.connect_timeout_s,
                command_timeout_s=s.command_timeout_s,
                data_timeout_s=s.data_timeout_s,
                starttls=s.starttls,
                tls_context=self._tls,
            )
        except BaseException:
            self.in_use -= 1
            raise

    def release(self, hop: Hop, *, clean: bool) -> None:
        """Give a connection back. `clean`: at a transaction boundary (after
        the final DATA reply or a successful RSET); anything else is closed.
        Its slot is free at once: a connection on its way out (QUIT, at most
        a second) is no use to anyone."""
        assert isinstance(hop, SmtpClient)
        self.in_use -= 1
        if (
            clean
            and not self._closed
            and hop.usable
            and hop.transactions < self.settings.max_transactions_per_connection
        ):
            self._idle.append(hop)
        else:
            self._background(hop.quit())

    def recycle(self, hop: Hop) -> None:
        """Give back a connection with an open transaction, between commands:
        RSET in the background, then it is reusable (or closed, if RSET fails)."""
        assert isinstance(hop, SmtpClient)
        self._background(self._reset(hop))

    async def _reset(self, hop: SmtpClient) -> None:
        clean = False
        try:
            clean = await hop.rset()
        finally:
            self.release(hop, clean=clean)

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        jobs = [*(c.quit() for c in idle), *self._tasks]
        await asyncio.gather(*jobs, return_exceptions=True)


class MaildirUpstream:
    """Delivery into one Maildir: tmp/, fsync, rename into new/ (maildir(5))."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def start(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    async def acquire(self, *, fresh: bool = False) -> MaildirHop:
        return MaildirHop(self.path)

    def release(self, hop: Hop, *, clean: bool) -> None:
        return None

    def recycle(self, hop: Hop) -> None:
        return None

    async def close(self) -> None:
        return None


_seq = count()
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


class MaildirHop:
    extensions: dict[str, str] = {"8BITMIME": "", "SMTPUTF8": "", "SIZE": ""}  # noqa: RUF012
    reused = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sender = ""

    async def mail(
        self, sender: str, options: list[str], xforward: Mapping[str, str] | None = None
    ) -> Reply:
        self.sender = sender
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        return Reply(250, "2.1.5 Ok")

    async def rset(self) -> bool:
        return True

    async def data(self, pieces: Sequence[Piece]) -> Reply:
        sender = self.sender if self.sender.startswith("<") else f"<{self.sender}>"
        try:
            name = await asyncio.to_thread(_deliver, self.path, sender, b"".join(pieces))
        except OSError as exc:
            log.error("maildir_write_failed", error=exc.strerror)
            return Reply(451, "4.3.0 Mailbox write failed, try again later")
        return Reply(250, f"2.0.0 Ok: delivered as {name}")


def _deliver(path: Path, sender: str, content: bytes) -> str:
    # Maildir files use LF line endings, like Postfix local(8)/virtual(8).
    text = b"Return-Path: " + sender.encode("utf-8", "surrogateescape") + b"\n"
    text += content.replace(b"\r\n", b"\n")
    now = time.time()
    name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_seq)}.{_HOST}"
    tmp = path / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(text)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path / "new" / name)
    dfd = os.open(path / "new", os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself is durable only once the directory is
    finally:
        os.close(dfd)
    return name
