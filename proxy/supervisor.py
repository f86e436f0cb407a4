"""`triaged serve` with server.workers != 1: the main process supervises
N front-end worker processes (proxy/worker.py) and moves no mail itself.

It binds every listener itself and hands the listening sockets to the
workers (inherited fds), so port 0 works:

- TCP listeners (SMTP, milter inet:): one SO_REUSEPORT socket per worker
  slot and address, all on one port (the first bind resolves port 0, the
  others bind that port). Each listens (backlog 1024) and slot K's go to
  worker K and to every replacement of it. The kernel spreads new
  connections over the slots by a hash of the 4-tuple, so every worker gets
  its share even of long-lived cached connections (Postfix) that arrive
  together at an idle host; one shared socket gave them to whichever worker
  woke first (asyncio accepts up to the backlog per wakeup, uvloop until
  EAGAIN): 8/0 splits were seen.
- We keep every slot's sockets open for our whole life. A worker's death
  then closes no listening socket: what the kernel queued on its slot stays
  queued (not reset) and the replacement, on the same socket, accepts it.
  So net.ipv4.tcp_migrate_req is not needed (it migrates requests of a
  socket being closed; ours never is while we run). The trade-off: while a
  slot has no worker (a replacement starting, ~0.3-0.9 s; a crash loop's
  backoff, up to 30 s; a hung worker until worker_hang_timeout_s kills it)
  the connections hashed to it wait in its backlog instead of going to the
  others. Nothing is lost or refused: an SMTP client waits 300 s for the
  greeting (RFC 5321 4.5.3.2.1), a milter client its connect timeout.
- unix: listeners (milter unix:/path) cannot be balanced by SO_REUSEPORT:
  one socket shared by all workers, as before (the first to wake accepts).
- Without SO_REUSEPORT (not Linux/BSD) TCP listeners are shared that way too.

- A worker that exits or crashes is replaced, with a backoff when it keeps
  dying soon after start (logged). A worker whose loop stops answering the
  control ping for server.worker_hang_timeout_s is killed and replaced.
- SIGTERM/SIGINT: STOPPING=1, SIGTERM to every worker (each drains like a
  single process does), wait for them (server.drain_timeout_s + a margin),
  SIGKILL what is left, exit 0.
- SIGHUP: the config file is read and checked first; a broken one is logged
  and nothing changes. Otherwise every worker gets SIGHUP and reloads as a
  single process does; changes to listeners or workers need a restart
  (logged).
- systemd: READY=1 once every worker listens, WATCHDOG=1 (WatchdogSec=)
  only while every live worker answers its ping.
- metrics.listen: one port, served here; /metrics merges every worker's
  registry with a `worker` label, /healthz and /readyz combine the workers'
  health snapshots (proxy/supervisor_status.py).
- With the ONNX model out of process, one inference service for all workers
  (proxy/supervisor_inference.py): started before them, closed after them,
  its model reloaded once per SIGHUP.

It runs the stdlib event loop: it relays no mail, and the stdlib's child
watcher (pidfd) is the well-trodden path for subprocess handling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import structlog
from prometheus_client.registry import Collector

from classifier.types import ClassifierError
from proxy import control
from proxy.health import watchdog_healthy, watchdog_interval_s, watchdog_loop
from proxy.httpd import StatusServer
from proxy.milter.listener import bind_unix
from proxy.server import _redact, effective_workers, sd_notify
from proxy.settings import (
    ConfigError,
    ListenerSettings,
    Settings,
    listener_address,
    load_settings,
    split_host_port,
)
from proxy.supervisor_inference import SharedInference, host_restart_keys, wants_host
from proxy.supervisor_status import combined, metrics_provider

log = structlog.get_logger("triaged.supervisor")

PING_INTERVAL_S = 1.0
# A worker that answered a ping this recently counts as responsive (watchdog, /healthz).
RESPONSIVE_S = 5.0
# A new worker must listen within this (model load included) or it is replaced.
START_TIMEOUT_S = 120.0
# A worker is restarted at once; one that dies again within this of its start
# backs off 1, 2, 4 ... 30 s (a broken model, a full disk, a crash loop).
STABLE_S = 60.0
MAX_BACKOFF_S = 30.0
STOP_MARGIN_S = 10.0
REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def supervise(settings: Settings, config_path: str | None, notify_socket: str | None) -> int:
    return asyncio.run(Supervisor(settings, config_path, notify_socket).run())


# [slot][listener] -> that listener's sockets (one per address) for slot's worker.
SlotSockets = list[list[list[socket.socket]]]


def bind_listeners(settings: Settings, slots: int = 1) -> SlotSockets:
    """Listening sockets for every worker slot and listener, in config order
    (what a single process binds in Server.start, bound once here): TCP
    ones per slot with SO_REUSEPORT, unix: ones shared (the same objects in
    every slot)."""
    per_slot = slots if REUSEPORT else 1
    bound: SlotSockets = [[] for _ in range(slots)]
    try:
        for listener in settings.server.listeners:
            where = listener_address(listener)
            if isinstance(where, str):
                shared = [bind_unix(where, listener)]
                for k in range(slots):
                    bound[k].append(shared)
                continue
            first = _bind_tcp(*where, reuseport=per_slot > 1)
            bound[0].append(first)
            for k in range(1, slots):
                # Every slot on the port the first one got (port 0 resolved),
                # per address (a name with IPv4 and IPv6 addresses).
                bound[k].append(first if per_slot == 1 else _bind_same(first))
    except BaseException:
        close_listeners(bound, settings, unlink=True)
        raise
    return bound


def _bind_tcp(host: str, port: int, *, reuseport: bool) -> list[socket.socket]:
    # As loop.create_server does: every address the name resolves to.
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            socks.append(_listen(family, type_, proto, addr, reuseport=reuseport))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind_same(first: list[socket.socket]) -> list[socket.socket]:
    """Another slot's sockets on the very addresses and ports of `first`."""
    socks: list[socket.socket] = []
    try:
        for sock in first:
            socks.append(_listen(sock.family, sock.type, sock.proto, sock.getsockname(), reuseport=True))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _listen(family: int, type_: int, proto: int, addr: Any, *, reuseport: bool) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            # Only sockets of our own user may join the group (Linux checks the euid).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise OSError(exc.errno, f"error while attempting to bind on address {addr!r}: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def close_listeners(bound: SlotSockets, settings: Settings, *, unlink: bool) -> None:
    """Close every slot's sockets (a shared one closes once: close is idempotent)."""
    for groups in bound:
        for group in groups:
            for sock in group:
                sock.close()
    if unlink and bound:
        for listener in settings.server.listeners[: len(bound[0])]:
            where = listener_address(listener)
            if isinstance(where, str):
                try:
                    os.unlink(where)
                except OSError:
                    pass


def describe(listener: ListenerSettings, socks: list[socket.socket]) -> list[str]:
    out = []
    for sock in socks:
        if sock.family == socket.AF_UNIX:
            out.append(f"unix:{sock.getsockname()}")
        else:
            host, port = sock.getsockname()[:2]
            prefix = "inet:" if listener.protocol == "milter" else ""
            out.append(f"{prefix}{host}:{port}")
    return out


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """Keys a SIGHUP cannot apply: they shape the processes and sockets."""
    keys = []
    if old.server.listeners != new.server.listeners:
        keys.append("server.listeners")
    if old.server.workers != new.server.workers:
        keys.append("server.workers")
    if old.metrics.listen != new.metrics.listen:
        keys.append("metrics.listen")
    if old.logging != new.logging:
        keys.append("logging")
    return keys


class WorkerSlot:
    """Slot K: at most one live worker process at a time."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: control.Channel | None = None
        self.listening = asyncio.Event()
        self.started_at = 0.0
        self.last_pong = 0.0
        self.health: dict[str, object] = {}
        self.starts = 0
        self.failures = 0  # consecutive short lives
        self.reload_pending = False  # a SIGHUP came while it was starting
        self._seq = 0
        self._pending: dict[int, asyncio.Future[control.Message]] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def live(self) -> bool:
        return self.pid is not None and self.listening.is_set()

    def responsive(self, now: float) -> bool:
        return self.live and now - self.last_pong < RESPONSIVE_S

    async def spawn(
        self, settings: Settings, sockets: list[list[socket.socket]], config_path: str | None,
        inference_endpoint: str = "",
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(s.fileno() for group in sockets for s in group)]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.worker", "--control-fd", str(theirs.fileno()),
                pass_fds=fds, stdin=asyncio.subprocess.DEVNULL, env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.starts += 1
        self.reload_pending = False  # it starts from the config we hold now
        self.health = {}  # the last one was the dead worker's
        self.started_at = time.monotonic()
        self.listening = asyncio.Event()
        self.channel = await control.Channel.open(ours)
        init = control.Init(
            slot=self.slot,
            settings=msgspec.msgpack.encode(settings),
            listener_fds=[[s.fileno() for s in group] for group in sockets],
            config_path=config_path,
            inference_endpoint=inference_endpoint,
        )
        try:
            await self.channel.send(init)
        except control.ChannelClosed:
            pass  # died at once: the monitor sees the exit
        self._reader = asyncio.create_task(self._read(self.channel), name=f"worker-{self.slot}-control")

    async def _read(self, channel: control.Channel) -> None:
        try:
            while True:
                msg = await channel.recv()
                if isinstance(msg, control.Listening):
                    self.last_pong = time.monotonic()
                    self.listening.set()
                    if self.reload_pending:
                        self.reload_pending = False
                        self.signal(signal.SIGHUP)
                elif isinstance(msg, control.Pong | control.MetricsReply):
                    if isinstance(msg, control.Pong):
                        self.last_pong = time.monotonic()
                        self.health = msg.health
                    fut = self._pending.pop(msg.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except control.ChannelClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(control.ChannelClosed("worker gone"))
            self._pending.clear()

    async def ask(self, make: type[control.Ping] | type[control.MetricsRequest], timeout_s: float) -> control.Message:
        channel = self.channel
        if channel is None or self.pid is None:
            raise control.ChannelClosed("no worker")
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[control.Message] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            await channel.send(make(seq=seq))
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self._pending.pop(seq, None)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def reap(self) -> int:
        assert self.proc is not None
        status = await self.proc.wait()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.listening.clear()
        return status


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None, notify_socket: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notify_socket = notify_socket
        self.slots = [WorkerSlot(k) for k in range(effective_workers(settings))]
        self.sockets: SlotSockets = []
        self.stopping = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.restarts = 0
        self.status: StatusServer | None = None
        self.metrics_port: int | None = None
        # One inference service for all workers (proxy/supervisor_inference.py).
        self.inference: SharedInference | None = None
        self._reload_lock = asyncio.Lock()

    # -- run ------------------------------------------------------------------

    async def run(self) -> int:
        try:
            self.sockets = bind_listeners(self.settings, len(self.slots))
        except (OSError, ValueError) as exc:
            log.error("start_failed", error=str(exc))
            return 1
        self._warn_orphaned_spools()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            if wants_host(self.settings):
                self.inference = SharedInference(self.settings.classifier)
                try:
                    await self.inference.start()
                except ClassifierError as exc:
                    log.error("start_failed", component="inference", error=str(exc))
                    self.inference = None
                    return 1
            if not await self._start_all():
                await self._stop_workers()
                return 0 if self._stop.is_set() else 1
            if self.settings.metrics.listen:
                try:
                    self._serve_status(loop)
                except OSError as exc:
                    log.error("start_failed", component="metrics", error=str(exc))
                    await self._stop_workers()
                    return 1
            log.info(
                "started",
                listeners=[d for lst, socks in zip(self.settings.server.listeners, self.sockets[0], strict=True)
                           for d in describe(lst, socks)],
                upstream=_redact(self.settings.upstream.url),
                workers=[s.pid for s in self.slots],
                metrics_port=self.metrics_port,
            )
            sd_notify("READY=1", self.notify_socket)
            for slot in self.slots:
                self._spawn_task(self._monitor(slot), f"monitor-{slot.slot}")
            self._spawn_task(self._pinger(), "pinger")
            watchdog_s = watchdog_interval_s(os.environ, os.getpid()) if self.notify_socket else None
            if watchdog_s is not None:
                self._spawn_task(
                    watchdog_loop(self.healthy, lambda m: sd_notify(m, self.notify_socket), watchdog_s),
                    "watchdog",
                )
            await self._stop.wait()
            self.stopping = True
            sd_notify("STOPPING=1", self.notify_socket)
            log.info("draining", workers=[s.pid for s in self.slots if s.pid is not None])
            await self._stop_workers()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.status is not None:
                self.status.close()
            close_listeners(self.sockets, self.settings, unlink=True)
            if self.inference is not None:
                # After the workers: their last batches ran through it.
                await self.inference.close()
        log.info("stopped")
        return 0

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_all(self) -> bool:
        """Start every worker; True once all listen. A worker that dies before
        listening at start is a start failure (its own log line says why)."""
        try:
            for slot in self.slots:
                await slot.spawn(self.settings, self.sockets[slot.slot], self.config_path, self._endpoint())
        except OSError as exc:
            log.error("start_failed", error=f"cannot start a worker: {exc}")
            return False
        waits: dict[asyncio.Future[object], WorkerSlot] = {
            asyncio.ensure_future(s.listening.wait()): s for s in self.slots
        }
        exits: dict[asyncio.Future[object], WorkerSlot] = {
            asyncio.ensure_future(s.proc.wait()): s for s in self.slots if s.proc is not None
        }
        stop: asyncio.Future[object] = asyncio.ensure_future(self._stop.wait())
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while waits:
                    done, _ = await asyncio.wait([*waits, *exits, stop], return_when=asyncio.FIRST_COMPLETED)
                    if stop in done:
                        return False
                    for fut in done:
                        if fut in exits:
                            slot = exits[fut]
                            log.error("start_failed", worker=slot.slot, status=fut.result(),
                                      reason="worker exited before listening (its line above says why)")
                            return False
                        del waits[fut]
        except TimeoutError:
            log.error("start_failed", error=f"workers did not listen within {START_TIMEOUT_S:.0f} s")
            return False
        finally:
            for fut in [*waits, *exits, stop]:
                fut.cancel()
        return True

    async def _monitor(self, slot: WorkerSlot) -> None:
        """Replace slot's worker whenever it exits, until we stop."""
        while True:
            status = await slot.reap()
            if self.stopping:
                return
            lived = time.monotonic() - slot.started_at
            slot.failures = 0 if lived >= STABLE_S else slot.failures + 1
            delay = 0.0 if slot.failures <= 1 else min(MAX_BACKOFF_S, 2.0 ** (slot.failures - 2))
            log.error("worker_exited", worker=slot.slot, status=status, lived_s=round(lived, 1),
                      restart_in_s=delay)
            if delay:
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                    return
                except TimeoutError:
                    pass
            while not await self._respawn(slot):
                # No process at all (out of memory, of processes, of fds):
                # try again, like a worker that keeps dying.
                slot.failures += 1
                try:
                    async with asyncio.timeout(min(MAX_BACKOFF_S, 2.0 ** slot.failures)):
                        await self._stop.wait()
                    return
                except TimeoutError:
                    pass
            if self.stopping:  # SIGTERM came while it was being started
                slot.signal(signal.SIGTERM)
                return

    async def _respawn(self, slot: WorkerSlot) -> bool:
        if self.stopping:
            return True
        try:
            await slot.spawn(self.settings, self.sockets[slot.slot], self.config_path, self._endpoint())
        except OSError as exc:
            log.error("worker_start_failed", worker=slot.slot, error=str(exc))
            return False
        self.restarts += 1
        log.info("worker_started", worker=slot.slot, pid=slot.pid, restarts=self.restarts)
        return True

    async def _pinger(self) -> None:
        """Ping every worker each second; kill one whose loop stays silent."""
        hang_s = self.settings.server.worker_hang_timeout_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            now = time.monotonic()
            if now - last > PING_INTERVAL_S + RESPONSIVE_S:
                # We were not running ourselves (SIGSTOP, a suspended VM, an
                # overloaded host): the workers' silence is ours, not theirs.
                # A fresh deadline for each rather than killing them all.
                for slot in self.slots:
                    slot.last_pong = max(slot.last_pong, now)
            last = now
            for slot in self.slots:
                if slot.pid is None:
                    continue
                if slot.listening.is_set():
                    silent = now - slot.last_pong
                    limit = hang_s
                else:
                    silent = now - slot.started_at
                    limit = START_TIMEOUT_S
                if silent > limit:
                    log.error("worker_unresponsive", worker=slot.slot, pid=slot.pid, silent_s=round(silent, 1))
                    slot.signal(signal.SIGKILL)
                    continue
                if slot.listening.is_set():
                    self._spawn_task(self._ping(slot), f"ping-{slot.slot}")
            if self.inference is not None:
                self._spawn_task(self.inference.check(), "ping-inference")

    async def _ping(self, slot: WorkerSlot) -> None:
        try:
            await slot.ask(control.Ping, RESPONSIVE_S)
        except (TimeoutError, control.ChannelClosed):
            pass

    def healthy(self) -> bool:
        """The watchdog's rule over all workers: every live one's loop and
        classifier answer, and one lives (proxy/supervisor_status.py)."""
        return watchdog_healthy(combined(self))

    def inference_problem(self) -> str | None:
        """Why the shared inference service is not answering, or None."""
        return self.inference.problem if self.inference is not None else None

    async def extra_collectors(self) -> list[Collector]:
        """The supervisor's own parts for /metrics: the inference service's stats."""
        if self.inference is None:
            return []
        collector = await self.inference.collector()
        return [collector] if collector is not None else []

    def _endpoint(self) -> str:
        return self.inference.endpoint if self.inference is not None else ""

    def _serve_status(self, loop: asyncio.AbstractEventLoop) -> None:
        host, port = split_host_port(self.settings.metrics.listen)
        self.status = StatusServer(host, port, metrics_provider(self, loop), lambda: combined(self))
        self.metrics_port = self.status.port

    async def _stop_workers(self) -> None:
        self.stopping = True
        for slot in self.slots:
            slot.signal(signal.SIGTERM)
        # Our copies of the listening sockets go too: once every worker has
        # closed its own, the kernel refuses new connections (as one process does).
        close_listeners(self.sockets, self.settings, unlink=False)
        loop = asyncio.get_running_loop()
        deadline = self.settings.server.drain_timeout_s + STOP_MARGIN_S
        until = loop.time() + deadline
        # Polled over the slots, not a fixed list: a replacement started just
        # before the signal is waited for too.
        while any(s.pid is not None for s in self.slots):
            if loop.time() > until:
                log.error("workers_killed", reason=f"still running {deadline:.0f} s after SIGTERM")
                for slot in self.slots:
                    slot.signal(signal.SIGKILL)
                until = float("inf")
            await asyncio.sleep(0.05)

    # -- SIGHUP ---------------------------------------------------------------

    def _on_hup(self) -> None:
        if self.stopping:
            return
        self._spawn_task(self._reload(), "reload")

    async def _reload(self) -> None:
        """SIGHUP: check the file; reload the shared model once; signal every worker."""
        async with self._reload_lock:  # SIGHUPs in a row: one after the other
            try:
                new = await asyncio.to_thread(load_settings, self.config_path)
            except ConfigError as exc:
                log.error("config_reload_failed", error=str(exc).replace("\n", "; "), kept="running config")
                return
            keys = restart_needed(self.settings, new)
            if self.inference is not None:
                keys += host_restart_keys(self.settings.classifier, new.classifier)
            if keys:
                log.warning("config_reload_needs_restart", keys=keys)
            # Replacement workers start from the new config, on the sockets we hold.
            server = msgspec.structs.replace(
                new.server, listeners=self.settings.server.listeners, workers=self.settings.server.workers
            )
            self.settings = msgspec.structs.replace(
                new, server=server, metrics=self.settings.metrics, logging=self.settings.logging
            )
            if self.inference is not None and new.classifier.kind == "onnx":
                # Once for the host, before the workers re-read what it serves.
                await self.inference.reload(new.classifier.model_path)
            if self.stopping:
                return
            pids = []
            for slot in self.slots:
                if slot.live:
                    slot.signal(signal.SIGHUP)
                    pids.append(slot.pid)
                elif slot.pid is not None:
                    # Still starting (it may have read the old config): once it listens.
                    slot.reload_pending = True
            log.info("reload_signalled", workers=pids)

    # -- events ---------------------------------------------------------------

    def _warn_orphaned_spools(self) -> None:
        """Slots past the worker count own spool directories nobody replays."""
        base = Path(self.settings.events.spool_dir)
        try:
            extra = [p for p in base.glob("worker-*") if p.name[7:].isdigit() and int(p.name[7:]) >= len(self.slots)]
        except OSError:
            return
        for path in extra:
            if any(path.glob("*.seg")):
                log.warning("spool_orphaned", path=str(path),
                            hint="start with more workers until it is replayed, then remove it")

