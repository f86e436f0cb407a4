"""Start, serve, drain. `serve_forever()` is `triaged serve`; `Server` is the
same thing as an importable async API (tests start it on port 0).

Graceful stop on SIGTERM/SIGINT: stop accepting, close idle sessions with
421, let open transactions finish for drain_timeout_s, then close the rest.
Readiness goes to systemd via sd_notify (Type=notify) when NOTIFY_SOCKET is set.
SIGHUP re-reads the config file (proxy/reload.py: live changes between
transactions, restart-only ones logged) and the model file, swapped in between
batches; a config or model that fails to load is logged and the old one keeps serving.
/healthz and /readyz beside /metrics (proxy/health.py, proxy/httpd.py); with
WATCHDOG_USEC set, WATCHDOG=1 only while the loop and the classifier answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from classifier.types import Classifier, ClassifierError
from proxy import logs
from proxy.health import (
    HealthMonitor,
    HealthTiming,
    watchdog_healthy,
    watchdog_interval_s,
    watchdog_loop,
)
from proxy.httpd import StatusServer, registry_metrics
from proxy.metrics import Metrics
from proxy.milter.listener import MilterContext, MilterListener, drain_milter
from proxy.pipeline import Pipeline
from proxy.settings import ConfigError, ListenerSettings, Settings, split_host_port
from proxy.smtp.session import RelayContext, TriageSMTP
from proxy.smtp.upstream import Upstream, build_upstream
from proxy.smtp.upstream_switch import SwitchableUpstream
from proxy.transaction import TransactionSink

if TYPE_CHECKING:
    from proxy.events import EventSink

log = structlog.get_logger("triaged")


def build_classifier(settings: Settings, metrics: Metrics | None = None) -> Classifier:
    from classifier.rules import RulesClassifier

    if settings.classifier.kind == "onnx":
        try:
            from classifier.service import OnnxClassifierService
        except ImportError as exc:
            log.warning("onnx_unavailable_using_rules", error=str(exc))
        else:
            return OnnxClassifierService(
                settings.classifier, metrics=metrics.batcher if metrics is not None else None
            )
    return RulesClassifier()


async def reload_classifier(classifier: Classifier, metrics: Metrics, path: str | None = None) -> bool:
    """SIGHUP: re-read the model file (or load `path` instead). A failed
    reload keeps the old model."""
    reload = getattr(classifier, "reload", None)
    if reload is None:
        log.info("classifier_reload_skipped", reason="classifier has no model file")
        return False
    try:
        model = await (reload() if path is None else reload(path))
    except Exception as exc:
        metrics.classifier_reloads.labels("failed").inc()
        log.error("classifier_reload_failed", error=str(exc))
        return False
    metrics.classifier_reloads.labels("ok").inc()
    log.info("classifier_reloaded", model=model)
    return True


def _server_tls(settings: Settings) -> ssl.SSLContext | None:
    s = settings.server
    if not (s.tls_cert_file and s.tls_key_file):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    return ctx


class Server:
    """The SMTP front end with its classifier, next hop and sinks.

    `classifier` defaults to the one `settings.classifier.kind` names;
    `sinks` receive every TransactionRecord (the metrics are always one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        classifier: Classifier | None = None,
        sinks: Sequence[TransactionSink] = (),
        upstream: Upstream | None = None,
        health_timing: HealthTiming | None = None,
        listen_sockets: Sequence[Sequence[socket.socket]] | None = None,
    ) -> None:
        self.settings = settings
        # Supervisor mode (proxy/worker.py): listening sockets bound by the
        # supervisor and inherited, one list per settings.server.listeners
        # entry; the worker serves on them instead of binding its own.
        self._listen_sockets = listen_sockets
        self.metrics = Metrics()
        self.classifier = classifier if classifier is not None else build_classifier(settings, self.metrics)
        self.pipeline = Pipeline(settings, self.classifier, [self.metrics, *sinks])
        # Switchable: a SIGHUP with a new [upstream] replaces the pool under
        # running transactions (proxy/reload.py).
        self.upstream = SwitchableUpstream(upstream or build_upstream(settings.upstream, settings.server.hostname))
        self.events: EventSink | None = None  # the events sink among `sinks`, swapped on reload
        self._servers: list[asyncio.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self.metrics_port: int | None = None
        self.ctx: RelayContext | None = None
        self.milter: MilterContext | None = None
        self.milter_listeners: list[MilterListener] = []
        self.health = HealthMonitor(self, health_timing or HealthTiming())
        # A caller that passes its own timing reads the snapshots itself (a
        # worker answering its supervisor's pings): the checks run for it.
        self._health_wanted = health_timing is not None
        self.status: StatusServer | None = None

    async def start(self) -> None:
        s = self.settings
        await self.classifier.start()
        await self.upstream.start()
        self.ctx = ctx = RelayContext(s, self.pipeline, self.upstream, self.metrics, _server_tls(s))
        loop = asyncio.get_running_loop()
        try:
            # Milter body bytes count against the same budget as SMTP DATA.
            self.milter = MilterContext(s, self.pipeline, ctx, self.metrics)
            for i, listener in enumerate(s.server.listeners):
                inherited = self._listen_sockets[i] if self._listen_sockets is not None else None
                if listener.protocol == "milter":
                    milter = MilterListener(self.milter, listener, sockets=inherited)
                    self.milter_listeners.append(milter)
                    await milter.start()
                    continue
                for srv in await _smtp_servers(loop, ctx, listener, inherited):
                    self._servers.append(srv)
                    bound = srv.sockets[0].getsockname()
                    self.addresses.append((str(bound[0]), int(bound[1])))
        except BaseException:
            await self._close_servers()
            await self.upstream.close()
            await self.classifier.close()
            raise
        for srv in self._servers:
            await srv.start_serving()
        # Readiness checks where /readyz is served, a caller asked for them,
        # or the watchdog does (_serve): an embedded server pings nothing and
        # opens no connections.
        self.health.start(checks=bool(s.metrics.listen) or self._health_wanted)
        if s.metrics.listen:
            host, port = split_host_port(s.metrics.listen)
            try:
                self.status = StatusServer(host, port, registry_metrics(self.metrics.registry), self.health.snapshot)
            except BaseException:
                await self.stop(drain_timeout_s=0.1)
                raise
            self.metrics_port = self.status.port
        log.info(
            "started",
            listeners=[f"{h}:{p}" for h, p in self.addresses] + [m.describe() for m in self.milter_listeners],
            upstream=_redact(s.upstream.url),
        )

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting, drain open transactions, close everything."""
        timeout = self.settings.server.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        ctx = self.ctx
        for srv in self._servers:
            srv.close()
        for milter in self.milter_listeners:
            milter.close()
        milter_drain = (
            asyncio.create_task(drain_milter(self.milter, timeout)) if self.milter is not None else None
        )
        if ctx is not None:
            ctx.draining = True
            for conn in list(ctx.connections):
                # Idle sessions go now; a transaction in progress may finish
                # (each session closes itself after its last reply).
                if conn.idle:
                    conn.shutdown()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while ctx.connections and loop.time() < deadline:  # noqa: ASYNC110 - polled, bounded
                await asyncio.sleep(0.05)
            for conn in list(ctx.connections):
                conn.shutdown()
        if milter_drain is not None:
            await milter_drain
        await self._close_servers()
        await self.upstream.close()
        await self.classifier.close()
        await self.health.close()
        if self.status is not None:
            self.status.close()
            self.status = None
        log.info("stopped")

    async def _close_servers(self) -> None:
        for milter in self.milter_listeners:
            milter.close()
            await milter.wait_closed()
        self.milter_listeners.clear()
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            try:
                async with asyncio.timeout(1.0):
                    await srv.wait_closed()
            except TimeoutError:
                pass
        self._servers.clear()


async def _smtp_servers(
    loop: asyncio.AbstractEventLoop,
    ctx: RelayContext,
    listener: ListenerSettings,
    inherited: Sequence[socket.socket] | None,
) -> list[asyncio.Server]:
    # Serve only once every listener is bound (start_serving=False): a client
    # that saw one port answer must find the others answering too.
    def factory() -> TriageSMTP:
        return TriageSMTP(ctx, listener)

    if inherited is not None:
        return [
            await loop.create_server(factory, sock=sock, backlog=1024, start_serving=False)
            for sock in inherited
        ]
    host, port = split_host_port(listener.address)
    srv = await loop.create_server(
        factory, host, port, reuse_address=True, backlog=1024, start_serving=False
    )
    return [srv]


def _redact(url: str) -> str:
    return url.split("@")[-1] if url.startswith("smtp://") else url


def sd_notify(message: str, address: str | None) -> None:
    """systemd's notify protocol: one datagram to NOTIFY_SOCKET (sd_notify(3))."""
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=exc.strerror)


class ServeHooks:
    """What differs between `triaged serve` as one process and as one worker
    of the supervisor (proxy/worker.py overrides these). Everything else
    (signals, SIGHUP reload, drain) is the same code in both."""

    def __init__(self, notify_socket: str | None) -> None:
        self.notify_socket = notify_socket
        # One list of listening sockets per settings.server.listeners entry,
        # inherited from the supervisor; None: bind them here.
        self.listen_sockets: Sequence[Sequence[socket.socket]] | None = None
        self.health_timing: HealthTiming | None = None  # None: Server's default

    def adapt(self, settings: Settings) -> Settings:
        """Applied to every config this process serves (also one re-read on
        SIGHUP): a worker points the event spool at its own slot, etc."""
        return settings

    def notify(self, message: str) -> None:
        """READY=1 / STOPPING=1: to systemd here, to the supervisor in a worker."""
        sd_notify(message, self.notify_socket)

    def started(self, server: Server) -> None:
        """The server serves (a worker starts answering its supervisor here)."""


async def _serve(
    settings: Settings,
    notify_socket: str | None,
    watchdog_s: float | None = None,
    *,
    config_path: str | None = None,
    hooks: ServeHooks | None = None,
) -> int:
    from proxy.events import make_event_sink
    from proxy.reload import reload_from_file

    hooks = hooks or ServeHooks(notify_socket)
    settings = hooks.adapt(settings)
    events = make_event_sink(settings.events)
    try:
        await events.start()
    except (OSError, ConfigError) as exc:
        # An unusable spool or event directory (permissions, a full disk, a
        # second instance holding the spool lock): one line, not a traceback.
        log.error("start_failed", component="events", error=str(exc))
        return 1
    server = Server(
        settings, sinks=[events], listen_sockets=hooks.listen_sockets, health_timing=hooks.health_timing
    )
    server.events = events
    server.metrics.registry.register(events.registry)  # event shipping metrics on the same endpoint
    try:
        await server.start()
    except (OSError, RuntimeError, ssl.SSLError, ClassifierError) as exc:
        # One line naming the cause (port in use, model unusable, bad cert),
        # not a traceback; the unit manager decides about restarts.
        log.error("start_failed", error=str(exc))
        await events.close()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[object]] = set()  # held so they are not collected mid-run

    def on_hup() -> None:
        # With a config file: re-read it (what changed live is applied, the
        # model file re-read); embedded defaults: only the model file.
        job = (
            reload_from_file(server, config_path, adapt=hooks.adapt)
            if config_path is not None
            else reload_classifier(server.classifier, server.metrics)
        )
        task: asyncio.Task[object] = loop.create_task(job)
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    hooks.started(server)
    hooks.notify("READY=1")
    watchdog = None
    if watchdog_s is not None:
        server.health.ensure_checks()
        watchdog = loop.create_task(watchdog_loop(
            lambda: watchdog_healthy(server.health.snapshot()),
            hooks.notify,
            watchdog_s,
        ))
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
    loop.remove_signal_handler(signal.SIGHUP)
    hooks.notify("STOPPING=1")
    log.info("draining", connections=len(server.ctx.connections) if server.ctx else 0)
    await server.stop()
    # After the drain: the last transactions' events too (the sink a reload put in).
    await (server.events or events).close()
    return 0


def serve_forever(settings: Settings, config_path: str | None = None) -> int:
    """`triaged serve`: run until SIGTERM/SIGINT; the process exit status.

    server.workers = 1: this process serves. Otherwise it becomes the
    supervisor of that many worker processes (proxy/supervisor.py).
    """
    logs.configure(settings.logging)
    notify_socket = os.environ.get("NOTIFY_SOCKET")  # read once, at start
    if effective_workers(settings) != 1:
        from proxy.supervisor import supervise

        return supervise(settings, config_path, notify_socket)
    import uvloop

    watchdog_s = watchdog_interval_s(os.environ, os.getpid()) if notify_socket else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, notify_socket, watchdog_s, config_path=config_path))


# Up to this many usable cores, "auto" with the ONNX model runs one worker:
# its inference process takes the other core. On 2 cores, two workers and
# the shared service they need cost more CPU per message and relayed fewer
# messages than one (bench/results/scale.md, 22:20: 1.648 against 1.070 ms
# per message, 926 against 1,026 msg/s).
ONE_WORKER_UP_TO_CORES = 2


def effective_workers(settings: Settings, cores: int | None = None) -> int:
    """server.workers, with 0 ("auto") as one per usable core (proxy/cpus.py;
    `cores` overrides it), but one on hosts of ONE_WORKER_UP_TO_CORES or
    fewer with the ONNX model."""
    from proxy.cpus import usable_cpus

    if settings.server.workers:
        return settings.server.workers
    cores = usable_cpus() if cores is None else cores
    c = settings.classifier
    if cores <= ONE_WORKER_UP_TO_CORES and c.kind == "onnx" and c.runner == "process":
        return 1
    return cores
