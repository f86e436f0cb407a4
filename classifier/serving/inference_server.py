"""The shared inference service: `python -m classifier.serving.inference_server`.

One process per host (or per GPU) holds the model; every front-end worker
connects to it (classifier/serving/remote_runner.py) and sends the feature
arrays of its batches. Requests from all connections go into one micro-batcher
(classifier/batcher.py: the same max_batch_size / max_wait_ms / queue_size
semantics as in a worker, Overloaded answered at once), so the model runs
once per batch for the whole host, on CUDA when configured and present
(classifier/providers.py, loaded by classifier/inference.load_and_warm exactly
as the process runner loads it).

- Features arrive computed: parsing is Python and scales with the workers;
  this process only runs the model (onnxruntime releases the GIL), so one
  loop thread reading sockets and one batcher thread are enough.
- Every request names the FeatureSpec its arrays were built for. A hot swap
  happens in the batcher thread between batches; a request built for another
  spec than the model now loaded is answered "stale" and the worker
  re-featurizes it once with the new spec (it never runs through a model
  whose features differ). Chosen over keeping the old model until its
  requests finish: no second copy of the model in GPU memory, and a batch
  never mixes models.
- If the model call raises on a batch, the batch is run again one message
  at a time, so only the message that makes it fail gets an error. A model
  call that hangs (no batch end in hang_timeout_s) ends the process: its
  supervisor (InferenceHost, or systemd for `triaged inference`) restarts it,
  and the workers give the header rules' verdict meanwhile.
- Reload (a Reload frame, or SIGHUP) loads the new model beside the old one,
  which keeps serving; a model that fails to load keeps the old one and the
  error goes back to the caller.

Supervised (`--parent-fd`): SIGTERM and SIGINT are ignored (systemd signals
the whole cgroup; the workers must drain through us first) and the service
stops when the supervisor writes to or closes that pipe (it also does when
the supervisor dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy.typing as npt
import structlog

from classifier.addresses import Networks
from classifier.batcher import Batcher, BatcherClosed
from classifier.child_logging import configure_child_logging
from classifier.config import ClassifierSettings
from classifier.inference import (
    DEFAULT_LOADER,
    BatchModel,
    labels_of,
    load_and_warm,
    predict,
    prefix_bytes_of,
    resolve_loader,
    spam_threshold_of,
)
from classifier.providers import ProviderChoice, log_choice
from classifier.serving import service_wire as wire
from classifier.serving.endpoints import Endpoint, parse_endpoint
from classifier.serving.feature_spec import FeatureSpec, spec_of
from classifier.types import Classification, ClassifierError, DeadlineExceeded, Overloaded

log = structlog.get_logger("triaged.inference")

# A batch the model has not finished in this many request timeouts (and at
# least HANG_MIN_S) is hung: the process exits and is restarted (as the
# process runner kills a hung inference process: classifier/service.py).
HANG_TIMEOUTS = 4
HANG_MIN_S = 10.0
# Labels kept in the per-connection stats: closed connections stay until
# this many are known, then the oldest closed ones go (workers reconnect after
# every service restart; the map must not grow without bound).
MAX_CONNECTION_LABELS = 1024
EX_SOFTWARE = 70  # sysexits.h: the hung-model exit


class Stale(ClassifierError):
    """Built for another feature spec than the model now loaded."""


@dataclass(frozen=True, eq=False)
class _Loaded:
    model: BatchModel
    choice: ProviderChoice
    spec: FeatureSpec
    spec_id: str
    generation: int
    path: str

    def info(self, request_id: int = 0) -> wire.Info:
        labels = labels_of(self.model)
        return wire.Info(
            request_id, self.generation, self.model.name_version, self.choice.kind,
            self.choice.reason, self.choice.device_id, self.spec,
            sorted(labels) if labels is not None else None, spam_threshold_of(self.model),
            prefix_bytes_of(self.model), os.getpid(),
        )


@dataclass(slots=True)
class _Item:
    conn: int  # connection number: "batches from several clients" is counted by it
    spec_id: str
    features: npt.NDArray[Any]


@dataclass
class _Conn:
    number: int
    label: str
    writer: asyncio.StreamWriter
    unix: bool
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def send(self, frame: wire.ToClient) -> None:
        if not self.writer.is_closing():
            self.writer.write(wire.encode(frame))


class _Counters:
    """The stats, updated by the batcher thread and the loop (under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.batch_sizes: Counter[int] = Counter()
        self.multi_client_batches = 0
        self.per_connection: dict[str, int] = {}
        self.overloaded = self.deadline = self.stale = self.errors = 0
        self.isolated_batches = self.reloads = self.failed_reloads = self.refused_clients = 0


class InferenceServer:
    """The service inside one process: a listener, a model, a batcher."""

    def __init__(
        self,
        settings: ClassifierSettings,
        listen: Endpoint,
        *,
        loader: str = DEFAULT_LOADER,
        model_path: str | None = None,
    ) -> None:
        self._settings = settings
        self._listen = listen
        self._loader = loader
        self._path = model_path or settings.model_path
        self._allow = Networks(settings.service.allowed_clients)
        self._current: _Loaded | None = None
        self._generation = 0
        self._batcher: Batcher[_Item, tuple[Classification, int]] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 0
        self._counters = _Counters()
        self._reload_lock = asyncio.Lock()
        self._batch_started: float | None = None  # monotonic, while the model runs
        self._hang_s = max(HANG_MIN_S, HANG_TIMEOUTS * settings.timeout_ms / 1000.0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socket_stat: os.stat_result | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopped = asyncio.Event()
        self.port: int | None = None  # the bound TCP port (listen port 0 in tests)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, start the batcher, listen. ClassifierError: the model
        does not load; OSError: the address is taken."""
        self._loop = asyncio.get_running_loop()
        self._current = await self._load(self._path)
        s = self._settings
        self._batcher = Batcher(self._run_batch, s.batcher, timeout_ms=s.timeout_ms,
                                thread_name="triaged-service")
        await self._batcher.start()
        self._server = await self._bind()
        self._spawn(self._watch_hangs())
        log_choice(self._current.choice, self._current.model.name_version)
        log.info("inference.listening", listen=str(self._listen), port=self.port,
                 model=self._current.model.name_version, pid=os.getpid())

    async def close(self) -> None:
        """Stop accepting, answer what is queued, close the connections."""
        if self._server is not None:
            self._server.close()
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close(drain=True)
        for conn in list(self._conns.values()):
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        self._remove_socket_file()
        self.stopped.set()
        log.info("inference.stopped")

    async def reload(self, path: str | None = None) -> str:
        """Load `path` (default: the current file) beside the serving model and
        swap it in between batches. On failure the old model stays; raises."""
        if self._batcher is None:
            raise BatcherClosed("inference service is not running")
        async with self._reload_lock:
            target = path if path is not None else self._path
            try:
                new = await self._load(target)
            except ClassifierError as exc:
                with self._counters.lock:
                    self._counters.failed_reloads += 1
                log.error("inference.reload_failed", path=target, error=str(exc))
                raise
            await self._batcher.run_in_worker(lambda: self._swap(new))
            self._path = target
            with self._counters.lock:
                self._counters.reloads += 1
            log_choice(new.choice, new.model.name_version)
            log.info("inference.reloaded", model=new.model.name_version,
                     generation=new.generation, spec=new.spec_id)
            return new.model.name_version

    def stats(self) -> wire.ServiceStats:
        c, cur = self._counters, self._current
        with c.lock:
            return wire.ServiceStats(
                pid=os.getpid(),
                name_version=cur.model.name_version if cur else "",
                generation=cur.generation if cur else 0,
                provider=cur.choice.kind if cur else "",
                batches=c.batches, requests=c.requests, batch_sizes=dict(c.batch_sizes),
                multi_client_batches=c.multi_client_batches,
                per_connection=dict(c.per_connection), connections=len(self._conns),
                overloaded=c.overloaded, deadline=c.deadline, stale=c.stale, errors=c.errors,
                isolated_batches=c.isolated_batches, reloads=c.reloads,
                failed_reloads=c.failed_reloads, refused_clients=c.refused_clients,
            )

    # -- the model ---------------------------------------------------------------

    async def _load(self, path: str) -> _Loaded:
        s = self._settings
        loader = resolve_loader(self._loader)

        def load() -> _Loaded:
            model, choice = load_and_warm(path, s.provider, s.device_id,
                                          s.intra_op_num_threads, loader, s.shadow_model_path)
            spec = spec_of(model)
            self._generation += 1  # one load at a time (the reload lock, or start)
            return _Loaded(model, choice, spec, spec.id, self._generation, path)

        # A thread of its own: batches go on with the old model meanwhile.
        return await asyncio.to_thread(load)

    def _swap(self, new: _Loaded) -> None:
        """In the batcher thread, between batches."""
        self._current = new
        # Posted now, from this thread, so the loop sends the new Info to every
        # connection before any result of a batch the new model runs.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._broadcast, new)

    def _broadcast(self, new: _Loaded) -> None:
        info = new.info()
        for conn in self._conns.values():
            conn.send(info)

    def _run_batch(self, items: list[_Item]) -> list[tuple[Classification, int] | Exception]:
        """One model call for a batch from any number of connections (batcher thread)."""
        current = self._current
        assert current is not None
        out: list[tuple[Classification, int] | Exception | None] = [None] * len(items)
        live: list[int] = []
        stale = 0
        for i, item in enumerate(items):
            if item.spec_id != current.spec_id:
                out[i] = Stale(f"features built for spec {item.spec_id}, "
                               f"{current.model.name_version} reads {current.spec_id}")
                stale += 1
            else:
                live.append(i)
        clients = len({items[i].conn for i in live})
        errors = 0
        isolated = False
        self._batch_started = time.monotonic()
        try:
            try:
                verdicts: Sequence[Classification | Exception] = predict(
                    current.model, [items[i].features for i in live])
            except Exception:
                # One message may make the runtime raise: run each alone so
                # that one fails alone and the rest get their verdicts.
                isolated = True
                verdicts = [self._one(current.model, items[i].features) for i in live]
        finally:
            self._batch_started = None
        for i, verdict in zip(live, verdicts, strict=True):
            if isinstance(verdict, Exception):
                errors += 1
                out[i] = verdict
            else:
                out[i] = (verdict, current.generation)
        with self._counters.lock:
            c = self._counters
            c.batches += 1
            c.requests += len(items)
            c.batch_sizes[len(items)] += 1
            c.multi_client_batches += clients > 1
            c.stale += stale
            c.errors += errors
            c.isolated_batches += isolated
        return [r if r is not None else ClassifierError("no result") for r in out]

    @staticmethod
    def _one(model: BatchModel, features: npt.NDArray[Any]) -> Classification | Exception:
        try:
            return predict(model, [features])[0]
        except Exception as exc:
            return ClassifierError(f"model failed on this message: {type(exc).__name__}: {exc}")

    async def _watch_hangs(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._hang_s / 4))
            started = self._batch_started
            if started is not None and time.monotonic() - started > self._hang_s:
                log.error("inference.hung", seconds=round(time.monotonic() - started, 1),
                          action="exit; the supervisor restarts the service")
                # The model thread cannot be interrupted; a fresh process can
                # serve. Exit without waiting for that thread.
                os._exit(EX_SOFTWARE)

    # -- the listener ------------------------------------------------------------

    async def _bind(self) -> asyncio.AbstractServer:
        ep = self._listen
        if not ep.is_unix:
            server = await asyncio.start_server(self._accept, ep.host, ep.port)
            self.port = server.sockets[0].getsockname()[1]
            return server
        _clear_stale_socket(ep.path)
        # The file gets its final mode as it is created: no moment when the
        # umask's wider mode lets another user connect.
        old = os.umask(0o777 & ~self._settings.service.socket_mode)
        try:
            server = await asyncio.start_unix_server(self._accept, ep.path)
        finally:
            os.umask(old)
        os.chmod(ep.path, self._settings.service.socket_mode)
        self._socket_stat = os.stat(ep.path)
        return server

    def _remove_socket_file(self) -> None:
        if not self._listen.is_unix or self._socket_stat is None:
            return
        with contextlib.suppress(OSError):
            now = os.stat(self._listen.path)
            # Only our own file: a successor may already have bound the path.
            if (now.st_ino, now.st_dev) == (self._socket_stat.st_ino, self._socket_stat.st_dev):
                os.unlink(self._listen.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        unix = self._listen.is_unix
        if not unix:
            address = peer[0] if isinstance(peer, tuple) else None
            if address not in self._allow:
                with self._counters.lock:
                    self._counters.refused_clients += 1
                log.warning("inference.client_refused", peer=address,
                            reason="not in classifier.service.allowed_clients")
                writer.close()
                return
        self._next_conn += 1
        number = self._next_conn
        label = f"#{number}" if unix else f"{peer[0]}:{peer[1]} #{number}"
        conn = _Conn(number, label, writer, unix)
        self._conns[number] = conn
        try:
            if self._current is not None:
                conn.send(self._current.info())
            await self._serve(conn, reader)
        except (wire.ChannelClosed, ConnectionError):
            pass
        finally:
            del self._conns[number]
            self._forget_closed()
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            writer.close()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        while True:
            payload = await wire.read_frame(reader)
            try:
                frame = wire.decode_to_service(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                conn.send(wire.Refused(0, f"bad frame: {exc}"))
                log.warning("inference.bad_frame", conn=conn.label, error=str(exc))
                return  # out of step: nothing it says next can be trusted
            if isinstance(frame, wire.Classify):
                self._on_task(conn, self._classify(conn, frame))
            elif isinstance(frame, wire.Ping):
                name = self._current.model.name_version if self._current else ""
                conn.send(wire.Pong(frame.id, os.getpid(), name))
            elif isinstance(frame, wire.GetInfo):
                if self._current is not None:
                    conn.send(self._current.info(frame.id))
            elif isinstance(frame, wire.GetStats):
                conn.send(wire.Stats(frame.id, self.stats()))
            elif isinstance(frame, wire.Reload):
                if frame.path is not None and not conn.unix:
                    conn.send(wire.Reloaded(frame.id, False, self._name(),
                                            "a model path is taken over the Unix socket only"))
                else:
                    self._on_task(conn, self._reload_frame(conn, frame))
            elif isinstance(frame, wire.Hello):
                self._rename(conn, f"{frame.client[:100]} #{conn.number}")
            await conn.writer.drain()

    def _rename(self, conn: _Conn, label: str) -> None:
        with self._counters.lock:
            per = self._counters.per_connection
            per[label] = per.pop(conn.label, 0)
        conn.label = label

    def _forget_closed(self) -> None:
        """Drop the oldest closed connections' counts past MAX_CONNECTION_LABELS."""
        with self._counters.lock:
            per = self._counters.per_connection
            if len(per) <= MAX_CONNECTION_LABELS:
                return
            open_labels = {c.label for c in self._conns.values()}
            for label in [k for k in per if k not in open_labels][:len(per) - MAX_CONNECTION_LABELS]:
                del per[label]

    def _on_task(self, conn: _Conn, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _name(self) -> str:
        return self._current.model.name_version if self._current is not None else ""

    async def _reload_frame(self, conn: _Conn, frame: wire.Reload) -> None:
        try:
            name = await self.reload(frame.path)
        except ClassifierError as exc:
            conn.send(wire.Reloaded(frame.id, False, self._name(), str(exc)))
        else:
            conn.send(wire.Reloaded(frame.id, True, name))

    async def _classify(self, conn: _Conn, frame: wire.Classify) -> None:
        with self._counters.lock:
            per = self._counters.per_connection
            per[conn.label] = per.get(conn.label, 0) + len(frame.arrays)
        batcher = self._batcher
        t0, c0 = time.perf_counter(), time.process_time()
        answers = await asyncio.gather(*(
            self._submit(batcher, _Item(conn.number, frame.spec_id, a.array()), frame.timeout_ms)
            for a in frame.arrays
        ))
        verdicts = [a[0] if isinstance(a, tuple) else a for a in answers]
        generations = [a[1] if isinstance(a, tuple) else 0 for a in answers]
        conn.send(wire.Results(frame.id, verdicts, generations,
                               time.perf_counter() - t0, time.process_time() - c0))

    async def _submit(self, batcher: Batcher[_Item, tuple[Classification, int]] | None,
                      item: _Item, timeout_ms: float) -> tuple[Classification, int] | str:
        if batcher is None:
            return wire.failure("error", "inference service is stopping")
        try:
            return await batcher.submit(item, timeout_ms=max(1.0, timeout_ms))
        except Overloaded as exc:
            with self._counters.lock:
                self._counters.overloaded += 1
            return wire.failure("overloaded", str(exc))
        except DeadlineExceeded as exc:
            with self._counters.lock:
                self._counters.deadline += 1
            return wire.failure("deadline", str(exc))
        except Stale as exc:
            return wire.failure("stale", str(exc))
        except ClassifierError as exc:  # BatcherClosed included
            return wire.failure("error", str(exc))


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file a killed predecessor left; refuse to take the path
    from a service that still answers on it."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise OSError(f"{folder}: no such directory for the socket "
                      "(systemd creates /run/triaged with RuntimeDirectory=triaged)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover
        return
    finally:
        probe.close()
    raise OSError(f"another inference service listens on {path}")


# -- the process -------------------------------------------------------------------




async def serve(
    settings: ClassifierSettings,
    listen: str,
    *,
    loader: str = DEFAULT_LOADER,
    model_path: str | None = None,
    parent_fd: int | None = None,
) -> int:
    """Run the service until SIGTERM/SIGINT (or, supervised, the parent's
    pipe); SIGHUP reloads. The exit status: 0, or 1 when it cannot start."""
    loop = asyncio.get_running_loop()
    server = InferenceServer(settings, parse_endpoint(listen), loader=loader,
                             model_path=model_path)
    try:
        await server.start()
    except (ClassifierError, OSError) as exc:
        log.error("inference.start_failed", error=str(exc))
        return 1
    stop = asyncio.Event()
    if parent_fd is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    else:
        os.set_blocking(parent_fd, False)
        loop.add_reader(parent_fd, stop.set)  # a byte, or EOF: the supervisor says stop

    def on_hup() -> None:
        async def reload() -> None:
            with contextlib.suppress(ClassifierError):  # logged; the old model serves
                await server.reload()

        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    log.info("inference.stopping")
    await server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m classifier.serving.inference_server")
    p.add_argument("--settings-json", required=True, help="ClassifierSettings as JSON")
    p.add_argument("--listen", help="unix:/path or host:port (default: classifier.service.listen)")
    p.add_argument("--loader", default=DEFAULT_LOADER, help="model loader, module:function")
    p.add_argument("--model-path", help="model file (default: classifier.model_path)")
    p.add_argument("--parent-fd", type=int, help="supervised: stop when this pipe speaks or closes")
    args = p.parse_args(argv)
    try:
        settings = msgspec.json.decode(args.settings_json, type=ClassifierSettings)
    except msgspec.MsgspecError as exc:
        print(f"inference service: settings: {exc}", file=sys.stderr)
        return 78
    if args.parent_fd is not None:
        # The supervisor decides when we stop (after its workers drained).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_child_logging("inference-service")
    return asyncio.run(serve(settings, args.listen or settings.service.listen,
                             loader=args.loader, model_path=args.model_path,
                             parent_fd=args.parent_fd))


if __name__ == "__main__":
    sys.exit(main())
