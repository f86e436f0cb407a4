"""A model loaded in an inference process of its own (classifier/worker_process.py).

Why a process: feature extraction is Python and holds the GIL. In one process
it competed with the SMTP event loop, so under load the batched model call got
a fraction of a core (bench/results/batching_cpu_thread_features_on_loop.md:
34% of its offline throughput). In a child it has a GIL and a core to itself.
It also contains failures, and the mail server stays up: when the runtime
crashes on a batch, a fresh process runs that batch again one message at a
time, so only a message that crashes it fails (the service gives it the
header rules' verdict instead); a hung process is killed and its batch fails
the same way.

The model is started (and restarted) in a thread, since it blocks until the
child answers Ready; after that the event loop owns the socket: a batch is one
write, and the answer is read by an asyncio protocol (framing.FrameConnection). No thread
of triaged waits on the child, so there are no GIL hand-offs with the SMTP
loop per batch (bench/results/cpu_profile.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import msgspec
import structlog

from classifier import worker_wire as wire
from classifier.inference import BatchTiming
from classifier.providers import ProviderChoice
from classifier.types import Classification, ClassifierError

log = structlog.get_logger("triaged.classifier")

# Loading can include CUDA start-up and the first session's allocations.
READY_TIMEOUT_S = 120.0
# After a failed (re)start, batches fail at once for this long instead of each
# paying for another start attempt.
RESTART_BACKOFF_S = 5.0
STOP_TIMEOUT_S = 5.0


class ProcessModel:
    """One inference process and the model it loaded.

    Batches run on the event loop (`classify_batch`, one at a time); spawn()
    and restarts block on the child's start-up and run in a thread.
    """

    def __init__(self, start: wire.Start, *, hang_timeout_s: float) -> None:
        self._start = start
        self._hang_timeout_s = hang_timeout_s
        self._lock = asyncio.Lock()  # one exchange at a time; restarts too
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None  # started, not yet on the loop
        self._channel: wire.ParentConnection | None = None
        self._retry_at = 0.0
        self._closed = False
        self.name_version = ""
        self.choice = ProviderChoice("cpu", [], "not started")
        self.prefix_bytes: int | None = None  # what the model reads (Ready says)

    @classmethod
    def spawn(cls, start: wire.Start, *, hang_timeout_s: float) -> ProcessModel:
        """Start the process and wait until its model is loaded (blocking:
        call it in a thread). ClassifierError says why it could not be."""
        model = cls(start, hang_timeout_s=hang_timeout_s)
        model._launch()
        return model

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """The process runs, or the next batch may start one (not closed, not
        in the restart backoff). For OnnxClassifierService.ping()."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return True
        return not self._closed and time.monotonic() >= self._retry_at

    async def classify_batch(
        self, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]:
        async with self._lock:
            try:
                answer = await self._exchange(raws)
            except _Crashed as crash:
                if len(raws) == 1:
                    raise ClassifierError(str(crash)) from None
                # One message may have crashed it (a runtime bug it triggers):
                # run each alone in a fresh process, so that one fails alone
                # and the rest still get their verdicts.
                log.warning("classifier.batch_crashed_isolating", size=len(raws))
                return await self._one_by_one(raws)
        return _unpack(answer)

    async def _one_by_one(
        self, raws: Sequence[bytes | memoryview]
    ) -> tuple[list[Classification | ClassifierError], BatchTiming]:
        verdicts: list[Classification | ClassifierError] = []
        timings: list[BatchTiming] = []
        for raw in raws:
            try:
                (verdict,), timing = _unpack(await self._exchange([raw]))
            except ClassifierError as exc:  # _Crashed included: this one alone
                verdicts.append(ClassifierError(str(exc)))
                continue
            verdicts.append(verdict)
            timings.append(timing)
        rows = [msgspec.structs.astuple(t) for t in timings] or [(0.0, 0.0, 0.0, 0.0)]
        return verdicts, BatchTiming(*(sum(column) for column in zip(*rows, strict=True)))

    async def close(self) -> None:
        """Ask the process to exit (after the batch it is running), then reap it."""
        self._closed = True
        async with self._lock:
            proc, sock, channel = self._proc, self._sock, self._channel
            self._proc = self._sock = self._channel = None
        if channel is not None:
            _stop_channel(channel)
        if sock is not None:
            try:
                wire.send(sock, wire.Stop())
            except OSError:
                pass
            sock.close()
        if proc is not None:
            await asyncio.to_thread(_stop, proc)

    # -- internals (lock held) ----------------------------------------------------

    async def _exchange(self, raws: Sequence[bytes | memoryview]) -> wire.Results | wire.BatchFailed:
        """One Run and its answer; raises _Crashed when the process died on it."""
        if self._closed:
            raise ClassifierError("inference process stopped")
        if self._proc is not None and self._proc.poll() is not None:
            # It died between batches (the OOM killer, a stray signal):
            # start another before this batch instead of failing it.
            await self._kill("exited between batches")
        channel = self._channel or await self._attach()
        if channel.poll():
            # It spoke before any question: out of step, so nothing it says next
            # can be trusted. This batch was not sent yet: a fresh process takes it.
            await self._kill("unexpected frame between batches", force=True)
            channel = await self._attach()
        try:
            # Views of the prefixes the service cut: encoded straight into
            # the frame, never copied on their own.
            channel.write(wire.encode(wire.Run([memoryview(r) for r in raws])))
            async with asyncio.timeout(self._hang_timeout_s):
                answer = await channel.receive()
        except TimeoutError:
            await self._kill(f"no answer in {self._hang_timeout_s:.0f} s", force=True)
            raise ClassifierError("inference process hung; killed") from None
        except (OSError, wire.ChannelClosed, ValueError) as exc:
            # ValueError: msgspec's DecodeError, a corrupted stream.
            why = await self._kill(f"{type(exc).__name__}: {exc}")
            raise _Crashed(f"inference process failed: {why}") from None
        if not isinstance(answer, wire.Results | wire.BatchFailed):
            # Out of step with us: nothing it says next can be trusted.
            await self._kill(f"unexpected {type(answer).__name__}", force=True)
            raise ClassifierError("inference process out of step; killed")
        return answer

    async def _attach(self) -> wire.ParentConnection:
        """Hand the started process's socket to the loop (restarting it first
        when it is gone)."""
        if self._sock is None:
            await self._restart()
        sock = self._sock
        assert sock is not None
        self._sock = None
        sock.settimeout(None)
        loop = asyncio.get_running_loop()
        try:
            _, channel = await loop.create_unix_connection(wire.parent_connection, sock=sock)
        except OSError as exc:
            sock.close()
            why = await self._kill(f"{type(exc).__name__}: {exc}")
            raise ClassifierError(f"inference process unusable: {why}") from None
        self._channel = channel
        return channel

    def _launch(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The child imports the loader by name: give it this process's path
        # (as multiprocessing's spawn does), so a loader importable here is there.
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd()
                                            for p in sys.path)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "classifier.worker_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        except OSError as exc:
            ours.close()
            raise ClassifierError(f"cannot start inference process: {exc}") from None
        finally:
            theirs.close()
        try:
            ours.settimeout(READY_TIMEOUT_S)
            wire.send(ours, self._start)
            answer = wire.receive_in_parent(ours)
        except (OSError, wire.ChannelClosed, ValueError) as exc:
            ours.close()
            _reap(proc)
            raise ClassifierError(
                f"inference process did not start: {type(exc).__name__}: {exc}"
                f" (exit status {proc.returncode})"
            ) from None
        if not isinstance(answer, wire.Ready):
            ours.close()
            _reap(proc)
            error = answer.error if isinstance(answer, wire.Failed) else repr(answer)
            raise ClassifierError(error)
        self._proc, self._sock = proc, ours
        self.name_version = answer.name_version
        self.choice = ProviderChoice(answer.provider, [], answer.provider_reason, answer.device_id)
        self.prefix_bytes = answer.prefix_bytes

    async def _restart(self) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            raise ClassifierError(
                f"inference process down; next start in {self._retry_at - now:.1f} s"
            )
        try:
            await asyncio.to_thread(self._launch)
        except ClassifierError as exc:
            self._retry_at = time.monotonic() + RESTART_BACKOFF_S
            log.error("classifier.worker_restart_failed", error=str(exc))
            raise
        if self._closed:  # closed while it started: nobody will use it
            proc, sock = self._proc, self._sock
            self._proc = self._sock = None
            if sock is not None:
                sock.close()
            if proc is not None:
                await asyncio.to_thread(_stop, proc)
            raise ClassifierError("inference process stopped")
        log.warning("classifier.worker_restarted", pid=self.pid, model=self.name_version)

    async def _kill(self, why: str, *, force: bool = False) -> str:
        """Drop a process that failed mid-batch; the next batch starts a new one.
        `force`: kill it at once (hung or out of step) and keep `why`; else
        give it a moment to exit and report how it ended."""
        proc, sock, channel = self._proc, self._sock, self._channel
        self._proc = self._sock = self._channel = None
        if channel is not None:
            _stop_channel(channel)
        if sock is not None:
            sock.close()
        if proc is not None:
            if force:
                proc.kill()
            status = await asyncio.to_thread(_reap, proc)
            if not force and status is not None and status < 0:
                why = f"killed by {signal.Signals(-status).name}"
            elif not force and status:
                why = f"exited with status {status}"
        log.error("classifier.worker_failed", pid=proc.pid if proc else None, error=why)
        return why


class _Crashed(ClassifierError):
    """The inference process died while it had our batch."""


def _unpack(
    answer: wire.Results | wire.BatchFailed,
) -> tuple[list[Classification | ClassifierError], BatchTiming]:
    if isinstance(answer, wire.BatchFailed):
        raise ClassifierError(f"model call failed: {answer.error}")
    verdicts = [v if isinstance(v, Classification) else ClassifierError(v)
                for v in answer.verdicts]
    return verdicts, answer.timing


def _stop_channel(channel: wire.ParentConnection) -> None:
    """Tell the process to exit (after its batch) and close our end."""
    try:
        channel.write(wire.encode(wire.Stop()))
    except wire.ChannelClosed:
        return  # it is gone already
    channel.close()  # flushes the Stop first


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a process told to Stop; kill it when it does not exit."""
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    """Kill `proc` if it still runs and return its exit status."""
    if proc.poll() is None:
        try:
            proc.wait(0.5)  # it may be exiting on its own (it reported an error)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


__all__ = ["ProcessModel"]
