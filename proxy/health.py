"""Liveness and readiness of one running server, for /healthz, /readyz and
the systemd watchdog.

Liveness: the process is alive and its event loop responsive. A task on the
loop stamps a heartbeat; a heartbeat older than `stale_after_s` means the
loop is blocked (or starved), and the process is not alive in any useful sense.

Readiness: alive, started and not draining, the model loaded, the inference
side answering (`await classifier.ping()` where the classifier has it) and not
degraded to its header-rules fallback, and the next hop reachable (an SMTP
greeting on a fresh connection, or the Maildir writable; probed at most every
`upstream_every_s`). A balancer takes an instance that is not ready out of
rotation; the instance itself keeps relaying what it is given.

Everything is computed on the loop and cached in one immutable snapshot, so
an HTTP thread (proxy/httpd.py) or a supervisor reads it without touching the
loop: `HealthMonitor.snapshot()` only re-checks the heartbeat's age.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import structlog

if TYPE_CHECKING:
    from proxy.server import Server

log = structlog.get_logger("triaged.health")


class HealthTiming(msgspec.Struct, frozen=True):
    """How often the monitor looks, and when it calls something dead.

    Not in the TOML config: the defaults suit every deployment we know of,
    and tests shorten them.
    """

    heartbeat_s: float = 0.25  # the loop stamps its heartbeat this often
    stale_after_s: float = 5.0  # a heartbeat this old: the loop is blocked
    check_every_s: float = 1.0  # readiness is recomputed this often
    ping_timeout_s: float = 2.0  # the inference side answers a ping within this
    upstream_every_s: float = 5.0  # the next hop is probed at most this often
    upstream_timeout_s: float = 3.0  # connect + greeting
    probe_upstream: bool = True  # off: the next hop is not part of readiness


class HealthSnapshot(msgspec.Struct, frozen=True):
    """One look at a server; msgspec.json.encode() gives the /healthz body."""

    alive: bool  # loop responsive
    ready: bool  # alive, and every readiness check passed
    reasons: list[str]  # why not alive / not ready; empty when ready
    loop_lag_s: float  # how late the last heartbeat woke (scheduling delay)
    heartbeat_age_s: float  # at the time of reading
    model: str | None = None
    classifier_ok: bool = False  # model loaded and answering (the watchdog's half)
    upstream_ok: bool = False
    draining: bool = False
    checked_age_s: float = 0.0  # how old the readiness part is
    pid: int = 0


_NOT_STARTED = HealthSnapshot(alive=True, ready=False, reasons=["not started"], loop_lag_s=0.0,
                              heartbeat_age_s=0.0)


class HealthMonitor:
    """Watches one proxy.server.Server from its own loop."""

    def __init__(self, server: Server, timing: HealthTiming | None = None) -> None:
        self.server = server
        self.timing = timing or HealthTiming()
        self._beat = time.monotonic()
        self._lag = 0.0
        self._checked = time.monotonic()
        self._cached = _NOT_STARTED
        self._upstream: tuple[float, str | None] | None = None  # (when, problem or None)
        self._tasks: list[asyncio.Task[None]] = []
        self._check_task: asyncio.Task[None] | None = None

    def start(self, *, checks: bool = True) -> None:
        """The heartbeat always; the readiness checks (a ping to the
        inference side every second, a connection to the next hop every few)
        only where something reads them: `checks`, or `ensure_checks()` later."""
        loop = asyncio.get_running_loop()
        self._beat = self._checked = time.monotonic()
        self._tasks = [loop.create_task(self._heartbeat())]
        if checks:
            self.ensure_checks()

    def ensure_checks(self) -> None:
        """Start the readiness checks if they are not running (on the loop)."""
        if self._check_task is None:
            self._checked = time.monotonic()
            self._check_task = asyncio.get_running_loop().create_task(self._checks())
            self._tasks.append(self._check_task)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._check_task = None

    # -- read from any thread ---------------------------------------------

    def snapshot(self) -> HealthSnapshot:
        """The cached snapshot with liveness judged now (thread-safe: two
        float reads and one reference read, each atomic under the GIL)."""
        cached = self._cached
        now = time.monotonic()
        age = now - self._beat
        checked_age = now - self._checked
        reasons = list(cached.reasons)
        alive = age <= self.timing.stale_after_s
        if not alive:
            reasons.insert(0, f"event loop unresponsive for {age:.1f}s")
        # A check that hangs (it should not: each await is bounded) must not
        # leave an old "ready" standing.
        fresh = checked_age <= self._check_bound()
        if not fresh and alive:
            reasons.append(f"readiness not rechecked for {checked_age:.1f}s")
        return msgspec.structs.replace(
            cached,
            alive=alive,
            ready=cached.ready and alive and fresh,
            reasons=reasons,
            classifier_ok=cached.classifier_ok and alive and fresh,
            heartbeat_age_s=round(age, 3),
            checked_age_s=round(checked_age, 3),
            loop_lag_s=round(self._lag, 4),
        )

    def _check_bound(self) -> float:
        t = self.timing
        return 3 * t.check_every_s + t.ping_timeout_s + t.upstream_timeout_s

    # -- on the loop ------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.timing.heartbeat_s
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._lag = max(0.0, now - before - interval)
            self._beat = now

    async def _checks(self) -> None:
        while True:
            try:
                self._cached = await self.check()
            except Exception:  # a bug here must not end the checks
                log.exception("health_check_failed")
            self._checked = time.monotonic()
            await asyncio.sleep(self.timing.check_every_s)

    async def check(self) -> HealthSnapshot:
        """Recompute readiness now (on the loop)."""
        server = self.server
        reasons: list[str] = []
        ctx = server.ctx
        draining = ctx is None or ctx.draining
        if ctx is None:
            reasons.append("not started")
        elif ctx.draining:
            reasons.append("draining")
        model, problem = await classifier_problem(server.classifier, self.timing.ping_timeout_s)
        if problem:
            reasons.append(problem)
        upstream_problem = await self._upstream_problem()
        if upstream_problem:
            reasons.append(upstream_problem)
        return HealthSnapshot(
            alive=True,
            ready=not reasons,
            reasons=reasons,
            loop_lag_s=self._lag,
            heartbeat_age_s=0.0,
            model=model,
            classifier_ok=problem is None,
            upstream_ok=upstream_problem is None,
            draining=draining,
            pid=os.getpid(),
        )

    async def _upstream_problem(self) -> str | None:
        t = self.timing
        if not t.probe_upstream:
            return None
        now = time.monotonic()
        if self._upstream is not None and now - self._upstream[0] < t.upstream_every_s:
            return self._upstream[1]
        problem = await upstream_problem(self.server.settings.upstream.url, t.upstream_timeout_s)
        if problem != (self._upstream[1] if self._upstream else None):
            log.info("upstream_health", ok=problem is None, problem=problem)
        self._upstream = (time.monotonic(), problem)
        return problem


async def classifier_problem(classifier: Any, ping_timeout_s: float) -> tuple[str | None, str | None]:
    """(model name, why the classifier is not ready or None).

    A classifier without a model file (the rules) has no `model_name`
    attribute and is always loaded; `ping` and `degraded` are used where the
    classifier has them (OnnxClassifierService).
    """
    model = getattr(classifier, "model_name", getattr(classifier, "model", None))
    if hasattr(classifier, "model_name") and model is None:
        return None, "model not loaded"
    ping = getattr(classifier, "ping", None)
    if ping is not None:
        try:
            async with asyncio.timeout(ping_timeout_s):
                ok = bool(await ping())
        except Exception:  # TimeoutError, a dead inference process, a bug: all "not answering"
            ok = False
        if not ok:
            return model, "inference service not answering"
    if getattr(classifier, "degraded", False):
        return model, "classifier degraded (header-rules fallback)"
    return model, None


async def upstream_problem(url: str, timeout_s: float) -> str | None:
    """Why the next hop looks unreachable, or None.

    smtp://: connect, expect a 220 greeting, QUIT (a clean session in the
    next hop's log, not a "lost connection after CONNECT"). maildir:PATH:
    its tmp/ and new/ are writable directories.
    """
    if url.startswith("maildir:"):
        path = Path(url.removeprefix("maildir:"))
        ok = await asyncio.to_thread(
            lambda: all(os.access(path / sub, os.W_OK | os.X_OK) for sub in ("tmp", "new"))
        )
        return None if ok else f"maildir {path} not writable"
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 25
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            line = await reader.readline()
            while line[3:4] == b"-":  # a multi-line greeting
                line = await reader.readline()
            if not line.startswith(b"220"):
                return f"upstream {host}:{port} greeted with {line[:3].decode('ascii', 'replace') or 'nothing'}"
            writer.write(b"QUIT\r\n")
            await writer.drain()
    except TimeoutError:
        return f"upstream {host}:{port} did not greet within {timeout_s:g}s"
    except OSError as exc:
        return f"upstream {host}:{port} unreachable: {exc.strerror or type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()
    return None


# -- systemd watchdog (sd_watchdog_enabled(3)) ----------------------------


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1: half of WATCHDOG_USEC, as systemd advises;
    None when the watchdog is off or meant for another process (WATCHDOG_PID).
    Read once at start, like NOTIFY_SOCKET."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


def watchdog_healthy(snapshot: HealthSnapshot) -> bool:
    """The watchdog's rule: the loop is responsive and the classifier answers.
    Not readiness: a next hop being down is not cured by a restart."""
    return snapshot.alive and snapshot.classifier_ok


async def watchdog_loop(healthy: Callable[[], bool], notify: Callable[[str], None], interval_s: float) -> None:
    """Send WATCHDOG=1 every `interval_s` while `healthy()`; silence otherwise,
    so systemd restarts a process whose loop or inference side is stuck.
    A supervisor passes its own `healthy` (all workers), a single process
    `lambda: watchdog_healthy(monitor.snapshot())`."""
    quiet = False
    while True:
        if healthy():
            notify("WATCHDOG=1")
            if quiet:
                log.info("watchdog_resumed")
            quiet = False
        elif not quiet:
            log.warning("watchdog_withheld")
            quiet = True
        await asyncio.sleep(interval_s)
