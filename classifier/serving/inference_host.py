"""InferenceHost: start and supervise the inference service of this host.

A multi-process front end starts one, before its workers, and points every
worker at it (classifier.runner = "service", classifier.endpoint = the
host's endpoint):

    host = InferenceHost(settings.classifier, "unix:/run/triaged/inference.sock")
    await host.start()          # spawns the service, returns once it answers
    ...                         # workers: runner "service", endpoint host.endpoint
    await host.reload()         # SIGHUP: the new model's name; raises, old one kept
    await host.stats()          # ServiceStats (batches across workers, ...)
    await host.ping()           # readiness / watchdog
    await host.close()          # after the workers drained

The service is `python -m classifier.serving.inference_server` in a process
of its own (its own GIL for the model call; a crash in the runtime costs the
batches in flight, not the supervisor). It ignores SIGTERM (systemd signals
the whole cgroup on stop, and the workers must drain through it) and stops
when this object tells it to through a pipe, or when this process dies and
the pipe closes. If it dies (SIGKILL, OOM killer, a hung model it exited
on) it is started again, with a backoff; the workers' batches fail over to
the header rules meanwhile and they reconnect on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import msgspec
import structlog

from classifier.config import ClassifierSettings
from classifier.inference import DEFAULT_LOADER
from classifier.serving import control
from classifier.serving import service_wire as wire
from classifier.serving.endpoints import parse_endpoint
from classifier.types import ClassifierError

log = structlog.get_logger("triaged.inference")

# Loading can include CUDA start-up and the first session's allocations.
READY_TIMEOUT_S = 120.0
# Restart backoff: doubles per quick death, back to the start after a
# process that lived STABLE_S.
RESTART_MIN_S = 0.1
RESTART_MAX_S = 10.0
STABLE_S = 30.0
# Reload: loading a model (CUDA included) and a warm-up.
RELOAD_TIMEOUT_S = 300.0


class InferenceHost:
    def __init__(self, settings: ClassifierSettings, endpoint: str, *,
                 loader: str = DEFAULT_LOADER) -> None:
        """`endpoint`: "unix:/path" (the usual: workers on this host) or
        "host:port". `loader`: "module:function" the service loads models with."""
        self._settings = settings
        self.endpoint = endpoint
        self._ep = parse_endpoint(endpoint)  # ValueError: malformed
        self._loader = loader
        self._model_path = settings.model_path  # a reload to another path sticks
        self._proc: asyncio.subprocess.Process | None = None
        self._pipe: int | None = None  # our end of the stop pipe
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._ready = False  # the current process answered
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        """The service's pid while it runs and has answered (None while it
        starts or restarts)."""
        proc = self._proc
        return proc.pid if self._ready and proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Spawn the service and wait until it answers. ClassifierError says
        why it did not (its own log lines, on stderr, say more)."""
        if self._supervisor is not None:
            return
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def reload(self, path: str | None = None) -> str:
        """Load `path` (default: the model file it serves) in the service and
        swap it in between batches; the new name_version. On failure the old
        model keeps serving and ClassifierError says why."""
        name = await control.reload(self._ep, path, RELOAD_TIMEOUT_S)
        if path is not None:
            self._model_path = path  # a restarted service loads this one
        log.info("inference.host_reloaded", model=name, pid=self.pid)
        return name

    async def stats(self) -> wire.ServiceStats:
        return await control.stats(self._ep)

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when the service answers (its loop runs and a model is loaded)."""
        return await control.ping(self._ep, timeout_s) is not None

    async def close(self) -> None:
        """Stop the service: it answers what is queued, then exits."""
        self._closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        proc = self._proc
        self._stop_pipe()
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), self._settings.timeout_ms / 1000.0 + 10.0)
            except TimeoutError:
                log.warning("inference.host_kill", pid=proc.pid, reason="did not stop in time")
                proc.kill()
                await proc.wait()

    # -- internals -------------------------------------------------------------------

    async def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = _child_path()
        settings = msgspec.json.encode(self._settings).decode()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "classifier.serving.inference_server",
                "--settings-json", settings, "--listen", self.endpoint,
                "--loader", self._loader, "--model-path", self._model_path,
                "--parent-fd", str(read_end),
                pass_fds=(read_end,), stdin=asyncio.subprocess.DEVNULL, env=env,
            )
        except OSError as exc:
            os.close(write_end)
            raise ClassifierError(f"cannot start the inference service: {exc}") from None
        finally:
            os.close(read_end)
        self._proc, self._pipe, self._ready = proc, write_end, False
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.returncode is not None:
                self._stop_pipe()
                raise ClassifierError(
                    f"inference service exited with status {proc.returncode} while starting "
                    "(its log says why)")
            pong = await control.ping(self._ep, 1.0)
            if pong is not None and pong.pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                await proc.wait()
                self._stop_pipe()
                raise ClassifierError(f"inference service did not answer in {READY_TIMEOUT_S:.0f} s")
            # Also wakes on its exit, so a failed start is reported at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.05)
        self._ready = True
        log.info("inference.host_started", pid=proc.pid, endpoint=self.endpoint,
                 model=pong.name_version)

    def _stop_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            with contextlib.suppress(OSError):
                os.write(pipe, b"q")  # even if a forked worker holds a copy of this end
            os.close(pipe)

    async def _supervise(self) -> None:
        backoff = RESTART_MIN_S
        while not self._closing:
            proc = self._proc
            assert proc is not None
            started = time.monotonic()
            status = await proc.wait()
            self._ready = False
            if self._closing:
                return
            self._stop_pipe()
            how = (f"killed by {signal.Signals(-status).name}" if status < 0
                   else f"exited with status {status}")
            if time.monotonic() - started > STABLE_S:
                backoff = RESTART_MIN_S
            log.error("inference.service_died", pid=proc.pid, how=how,
                      restart_in_s=round(backoff, 2),
                      effect="batches in flight got the header rules' verdict")
            while not self._closing:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_MAX_S)
                try:
                    await self._spawn()
                except ClassifierError as exc:
                    log.error("inference.restart_failed", error=str(exc),
                              retry_in_s=round(backoff, 2))
                    continue
                self.restarts += 1
                log.warning("inference.service_restarted", pid=self.pid, restarts=self.restarts)
                break


def _child_path() -> str:
    """The service imports its loader by name: give it this process's path
    (as classifier/process_runner.py does for the inference process)."""
    return os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)


__all__ = ["InferenceHost"]
