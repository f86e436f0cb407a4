"""One front-end worker of the supervisor: `python -m proxy.worker --control-fd N`.

The supervisor (proxy/supervisor.py) starts it as a fresh interpreter with
subprocess `pass_fds` rather than multiprocessing: the listening sockets and
the control socket arrive as plain inherited fds at known numbers, nothing of
the supervisor's state (threads, event loop) is forked, and `ps` shows what
each process is. The worker reads one Init frame (its slot, the validated
config, which fd serves which listener), then runs exactly the single-process
`_serve` of proxy/server.py on its own uvloop, with hooks for what differs:
sockets inherited instead of bound, READY reported to the supervisor instead
of systemd, its own event spool directory, and a task that answers the
supervisor's pings and metrics requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import structlog

from proxy import control, logs
from proxy.health import HealthTiming
from proxy.server import ServeHooks, Server, _serve
from proxy.settings import EventsSettings, Settings
from proxy.supervisor_inference import for_worker

log = structlog.get_logger("triaged.worker")


def slot_spool_dir(events: EventsSettings, slot: int) -> str:
    """One spool directory per worker slot (the spool allows one owner per
    directory): slot 0 keeps events.spool_dir itself, so a switch between
    workers = 1 and more keeps replaying what slot 0 left; slot K > 0 uses
    `<spool_dir>/worker-K` (the spool ignores subdirectories). A replacement
    worker takes its slot's directory over once the dead one's lock is gone."""
    if slot == 0:
        return events.spool_dir
    return str(Path(events.spool_dir) / f"worker-{slot}")


class WorkerHooks(ServeHooks):
    def __init__(
        self, slot: int, sockets: Sequence[Sequence[socket.socket]], control_sock: socket.socket, *, probe_upstream: bool
    ) -> None:
        super().__init__(None)
        self.slot = slot
        self.listen_sockets = sockets
        self.inference_endpoint = ""
        # The supervisor serves /readyz from our health snapshots: probe the
        # next hop when it has a metrics listener, as a single process does.
        self.health_timing = HealthTiming(probe_upstream=probe_upstream)
        self._control_sock = control_sock
        self._listening = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def adapt(self, settings: Settings) -> Settings:
        events = msgspec.structs.replace(settings.events, spool_dir=slot_spool_dir(settings.events, self.slot))
        # The supervisor serves the one metrics port (with every worker's registry).
        metrics = msgspec.structs.replace(settings.metrics, listen="")
        classifier = settings.classifier
        if self.inference_endpoint:
            # The supervisor's one inference service for all workers.
            classifier = for_worker(classifier, self.inference_endpoint)
        return msgspec.structs.replace(settings, events=events, metrics=metrics, classifier=classifier)

    def notify(self, message: str) -> None:
        if message == "READY=1":
            self._listening.set()

    def started(self, server: Server) -> None:
        if _hup_while_starting:  # the loop's SIGHUP handler is installed now
            os.kill(os.getpid(), signal.SIGHUP)
        task = asyncio.get_running_loop().create_task(self._control(server), name="worker-control")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _control(self, server: Server) -> None:
        channel = await control.Channel.open(self._control_sock)
        try:
            await self._listening.wait()
            await channel.send(control.Listening(pid=os.getpid()))
            while True:
                msg = await channel.recv()
                if isinstance(msg, control.Ping):
                    health = msgspec.to_builtins(server.health.snapshot())
                    await channel.send(control.Pong(seq=msg.seq, health=health))
                elif isinstance(msg, control.MetricsRequest):
                    families = control.collect_families(server.metrics.registry)
                    await channel.send(control.MetricsReply(seq=msg.seq, families=families))
        except control.ChannelClosed:
            # The supervisor is gone (or stopping us): drain and exit like on
            # SIGTERM, so no transaction is cut short by its death.
            log.warning("supervisor_gone")
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            channel.close()


def _read_init(sock: socket.socket) -> control.Init:
    """The first frame, read blocking before the event loop exists."""
    head = _recv_exactly(sock, 4)
    (size,) = struct.unpack(">I", head)
    if size > control.MAX_FRAME:
        raise ValueError(f"init frame of {size} bytes")
    msg = msgspec.msgpack.decode(_recv_exactly(sock, size), type=control.Message)
    if not isinstance(msg, control.Init):
        raise ValueError(f"expected Init, got {type(msg).__name__}")
    return msg


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("supervisor closed the control channel")
        buf += chunk
    return bytes(buf)


_hup_while_starting = False


def _early_signals() -> None:
    """Until `_serve` installs its handlers: a SIGHUP (the supervisor's, or a
    `kill -HUP` of the whole group) must not kill a starting worker (SIGHUP's
    default action); it is remembered and replayed once the handler is there.
    SIGINT (Ctrl-C reaches the whole foreground group) is the supervisor's to
    turn into SIGTERM, not a KeyboardInterrupt traceback in the middle of imports."""

    def on_hup(_sig: int, _frame: object) -> None:
        global _hup_while_starting
        _hup_while_starting = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    _early_signals()
    parser = argparse.ArgumentParser(prog="proxy.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)

    from proxy.malloc import fix_mmap_threshold

    fix_mmap_threshold()
    control_sock = socket.socket(fileno=args.control_fd)
    try:
        init = _read_init(control_sock)
    except (OSError, EOFError, ValueError, msgspec.DecodeError) as exc:
        print(f"triaged worker: no start message from the supervisor: {exc}", file=sys.stderr)
        return 1
    settings = msgspec.msgpack.decode(init.settings, type=Settings)
    logs.configure(settings.logging, fields={"worker": init.slot})
    sockets = [[socket.socket(fileno=fd) for fd in fds] for fds in init.listener_fds]
    for group in sockets:
        for sock in group:
            sock.setblocking(False)
    control_sock.setblocking(False)
    hooks = WorkerHooks(init.slot, sockets, control_sock, probe_upstream=bool(settings.metrics.listen))
    hooks.inference_endpoint = init.inference_endpoint
    from proxy.gcpolicy import settle_heap

    settle_heap()  # as `triaged serve` does: the start-up heap out of full collections
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, None, config_path=init.config_path, hooks=hooks))


if __name__ == "__main__":
    sys.exit(main())
