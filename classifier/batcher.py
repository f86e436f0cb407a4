"""A generic micro-batcher: many concurrent callers, one model call per batch.

Shape (after Triton's dynamic batcher and Ray Serve's @serve.batch, with the
safety they lack):

- A bounded, thread-safe queue. `submit()` on a full queue raises Overloaded
  at once; it never waits for room.
- One worker thread both collects batches and runs them, as Triton's dynamic
  batcher does. Collection used to be a coroutine, and on a loop saturated by
  SMTP and feature extraction every coroutine waits its turn: the loop's lag
  (tens of ms) landed in the queue wait
  (bench/results/batching_cpu_thread_features_on_loop.md). The
  worker waits on a condition variable instead, so a batch starts as soon as
  the worker is free and the window ends, however busy the loop is.
  The runner releases the GIL while it works (waiting on the inference
  process's socket, or inside onnxruntime's session.run), so the loop keeps
  serving sockets meanwhile. Only one batch runs at a time; requests that arrive
  meanwhile queue up, so batches form naturally under load.
- When the worker is free it takes what is queued (up to max_batch_size) and
  then keeps collecting only while requests keep arriving and the first
  request has waited less than max_wait_ms (on perf_counter, in the worker).
  "Arriving" is probed as before: the worker posts a marker to the event loop;
  if the loop ran it and no request was submitted since, nothing is coming
  soon enough to be worth waiting for and the batch closes at once ("idle"):
  a lone request under light load pays no batching window at all. The probe
  never stretches the window: the worker waits for it at most until the
  window ends.
- Every request has a deadline. A queued request whose deadline passed is
  never run (DeadlineExceeded); a caller whose deadline passes while its batch
  runs gets DeadlineExceeded and the result is dropped.
- The worker never touches an asyncio future: results, errors and metrics go
  back with loop.call_soon_threadsafe, and are set only on futures that are
  not done, so a caller that was cancelled (or timed out) never breaks its
  batch or anyone else.
- The outputs are counted against the inputs; a mismatch or an exception in
  `run_batch` fails exactly that batch's callers, and the next batch runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from classifier.batch_metrics import BatcherMetrics, CloseReason, NullMetrics
from classifier.config import BatcherSettings
from classifier.types import ClassifierError, DeadlineExceeded, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

_NEVER = 1 << 62  # a wake depth no queue reaches

# run_batch may answer one item with an Exception instance instead of a result:
# that item's caller gets it, the rest of the batch is unaffected (one
# malformed message must not fail 63 others).
RunBatch = Callable[[list[In]], Sequence[Out | Exception]]


class BatcherClosed(ClassifierError):
    """The batcher is closing or closed and takes no new requests."""


@dataclass(eq=False)
class _Request(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    deadline: float  # loop.time(), for the caller's own timeout
    # perf_counter() at submit: the worker's clock for the window, the queue
    # wait metric and expiry (uvloop's loop.time() ticks in whole ms, and the
    # worker must not read the loop's clock anyway).
    submitted: float
    expires: float  # perf_counter() deadline


@dataclass(frozen=True, slots=True)
class _Started:
    """What the worker saw as a batch started, for the metrics hooks."""

    size: int
    reason: CloseReason
    waits: list[float]  # seconds from each request's submit to the start
    depth: int  # requests left queued


@dataclass(eq=False)
class Call(Generic[T]):
    """A function to run between batches (run_in_worker), and its caller's future."""

    fn: Callable[[], T]
    future: asyncio.Future[T]


class Batcher(Generic[In, Out]):
    """Batches `submit()` calls into `run_batch(list_of_items)` in one thread."""

    def __init__(
        self,
        run_batch: RunBatch[In, Out],
        settings: BatcherSettings,
        *,
        timeout_ms: float,
        metrics: BatcherMetrics | None = None,
        thread_name: str = "triaged-infer",
    ) -> None:
        self._run_batch = run_batch
        self._settings = settings
        self._timeout_s = timeout_ms / 1000.0
        self._metrics: BatcherMetrics = metrics if metrics is not None else NullMetrics()
        self._thread_name = thread_name
        # Everything below the condition's lock is shared with the worker.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Request[In, Out]] = deque()
        self._calls: deque[Call[Any]] = deque()
        self._closing = False
        self._arrivals = 0  # submits so far: the "is more coming?" probe
        # Queue depth at which a submit wakes the worker: 1 while it waits for
        # a first request, "enough to fill the batch" while it collects. Each
        # wake costs the worker a GIL hand-off from the busy loop thread, so a
        # collecting worker sleeps until the window ends, the probe answers or
        # the batch can be filled, not at every arrival.
        self._wake_depth = 1
        self._probes_sent = 0  # markers posted to the loop by the worker
        self._probes_answered = 0  # ... and run by the loop (in order)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        # A daemon: a process that exits without close() must not hang on it.
        self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
        self._thread.start()

    async def run_in_worker(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the inference thread, between batches (warm-ups, probes)."""
        if self._loop is None or self._closing:
            raise BatcherClosed("batcher not started")
        future: asyncio.Future[T] = self._loop.create_future()
        call = Call(fn, future)
        with self._cond:
            self._calls.append(call)
            self._cond.notify()
        return await call.future

    def _check_room(self) -> None:
        """Raise BatcherClosed, or Overloaded at once on a full queue."""
        if self._closing or self._thread is None:
            raise BatcherClosed("classifier is not running")
        if len(self._queue) >= self._settings.queue_size:
            with self._cond:
                # Drop entries of callers who already left, so they do not
                # hold slots against live callers.
                self._queue = deque(r for r in self._queue if not r.future.done())
                full = len(self._queue) >= self._settings.queue_size
            if full:
                self._metrics.overload()
                raise Overloaded("classifier queue full")

    async def submit(self, item: In, *, timeout_ms: float | None = None) -> Out:
        """Queue `item` and wait for its result.

        Raises Overloaded at once when the queue is full, DeadlineExceeded when
        the deadline (timeout_ms, else the batcher's) passes first, and
        ClassifierError when its batch failed.
        """
        self._check_room()
        loop = asyncio.get_running_loop()
        timeout_s = self._timeout_s if timeout_ms is None else timeout_ms / 1000.0
        submitted = time.perf_counter()
        request: _Request[In, Out] = _Request(
            item, loop.create_future(), loop.time() + timeout_s, submitted, submitted + timeout_s
        )
        with self._cond:
            self._queue.append(request)
            self._arrivals += 1
            depth = len(self._queue)
            if depth >= self._wake_depth:
                self._cond.notify()
        self._metrics.queue_depth(depth)
        try:
            async with asyncio.timeout_at(request.deadline):
                # Awaiting the future directly: if this caller is cancelled the
                # future is cancelled too, and the worker skips it.
                return await request.future
        except TimeoutError:
            self._metrics.timeout()
            raise DeadlineExceeded(f"no verdict within {timeout_s * 1000:.0f} ms") from None

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking requests; run what is queued (drain) or fail it, then stop.

        Draining is bounded: every queued request has a deadline.
        """
        self._closing = True
        with self._cond:
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._cond.notify_all()
        for request in dropped:
            if not request.future.done():
                request.future.set_exception(BatcherClosed("classifier shut down"))
        if self._thread is not None and self._stopped is not None:
            try:
                # Set by the worker as its last act, after its last results
                # were posted (the loop runs them in order, before this).
                await asyncio.shield(self._stopped)
            finally:
                self._thread.join(timeout=1.0)
                self._thread = None

    # -- worker thread -------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._queue or self._calls or self._closing):
                        self._wake_depth = 1
                        self._cond.wait()
                    call = self._calls.popleft() if self._calls else None
                    if call is None and not self._queue:
                        return  # closing, nothing left
                    batch, reason, expired = (
                        self._collect() if call is None else ([], "idle", [])
                    )
                if call is not None:
                    self._run_call(call)
                    continue
                if expired:
                    self._post(self._expire, expired)
                if batch:
                    try:
                        self._run(batch, reason)
                    except Exception as exc:  # a bug here must not strand the callers
                        self._post(self._fail, batch, exc)
        finally:
            with self._cond:
                left = [*self._queue, *self._calls]  # non-empty only after a bug
                self._queue.clear()
                self._calls.clear()
            self._post(self._exited, left)

    def _collect(self) -> tuple[list[_Request[In, Out]], CloseReason, list[_Request[In, Out]]]:
        """Form one batch (lock held; waits release it)."""
        self._wake_depth = _NEVER  # not waiting: submits need not notify
        max_size = self._settings.max_batch_size
        batch: list[_Request[In, Out]] = []
        expired: list[_Request[In, Out]] = []
        self._take(batch, expired)
        if not batch:
            return batch, "idle", expired
        window_end = batch[0].submitted + self._settings.max_wait_ms / 1000.0
        probe: int | None = None  # the marker this batch waits on
        seen = 0  # arrivals when it was posted
        while True:
            if len(batch) >= max_size:
                return batch, "full", expired
            if self._closing:
                return batch, "drain", expired
            now = time.perf_counter()
            if now >= window_end:
                return batch, "timeout", expired
            if self._queue:
                self._take(batch, expired)
                continue
            if probe is not None and self._probes_answered >= probe:
                if self._arrivals == seen:
                    # The loop ran a whole pass and no caller submitted.
                    return batch, "idle", expired
                probe = None  # something arrived meanwhile: probe again
            if probe is None:
                seen = self._arrivals
                self._probes_sent += 1
                probe = self._probes_sent
                if not self._post(self._answer_probe):
                    return batch, "idle", expired  # no loop to ask
            self._wake_depth = max_size - len(batch)
            self._cond.wait(window_end - now)

    def _take(self, batch: list[_Request[In, Out]], expired: list[_Request[In, Out]]) -> None:
        """Move live requests from the queue into `batch`, setting aside expired
        ones (lock held)."""
        max_size = self._settings.max_batch_size
        now = time.perf_counter()
        while self._queue and len(batch) < max_size:
            request = self._queue.popleft()
            if request.future.done():  # caller cancelled or timed out
                continue
            if now >= request.expires:
                expired.append(request)  # never run a request nobody will wait for
                continue
            batch.append(request)

    def _run(self, batch: list[_Request[In, Out]], reason: CloseReason) -> None:
        # Requests may have been cancelled during the collection window.
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        start = time.perf_counter()
        # Handed to the loop with the results, in one wake-up of the loop.
        started = _Started(len(live), reason, [start - r.submitted for r in live],
                           len(self._queue))
        items = [r.item for r in live]
        c0 = time.thread_time()
        try:
            outputs = self._run_batch(items)
        except Exception as exc:  # run_batch raised: fail exactly this batch
            self._post(self._failed, started, live, exc)
            return
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - c0
        self._post(self._deliver, started, live, outputs, elapsed, cpu)

    def _run_call(self, call: Call[Any]) -> None:
        try:
            result = call.fn()
        except Exception as exc:
            self._post(_settle, call.future, None, exc)
        else:
            self._post(_settle, call.future, result, None)

    def _post(self, fn: Callable[..., None], *args: Any) -> bool:
        """Hand `fn(*args)` to the event loop; False if the loop is gone."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: nobody is waiting any more
            return False
        return True

    # -- on the event loop (posted by the worker) ------------------------------

    def _answer_probe(self) -> None:
        with self._cond:
            self._probes_answered += 1
            self._cond.notify()

    def _expire(self, requests: list[_Request[In, Out]]) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(DeadlineExceeded("deadline passed in queue"))
                self._metrics.timeout()

    def _started(self, started: _Started) -> None:
        self._metrics.batch(started.size, started.reason)
        self._metrics.queue_depth(started.depth)
        for wait in started.waits:
            self._metrics.queue_wait(wait)

    def _failed(self, started: _Started, live: list[_Request[In, Out]], exc: Exception) -> None:
        self._started(started)
        self._metrics.error(len(live))
        self._fail(live, exc)

    def _deliver(
        self, started: _Started, live: list[_Request[In, Out]],
        outputs: Sequence[Out | Exception], elapsed: float, cpu: float,
    ) -> None:
        self._started(started)
        self._metrics.inference(elapsed, len(live), cpu)
        mismatch = hand_out([r.future for r in live], outputs)
        if mismatch is not None:
            self._metrics.error(len(live))
            self._fail(live, mismatch)

    def _exited(self, left: list[_Request[In, Out] | Call[Any]]) -> None:
        self._fail(left, BatcherClosed("classifier worker stopped"))
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _fail(self, batch: Sequence[_Request[In, Out] | Call[Any]], cause: Exception) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(failure_for(cause))


def hand_out(futures: Sequence[asyncio.Future[Any]], outputs: Sequence[Any]) -> ClassifierError | None:
    """Give each caller of a batch its output (an Exception instance fails
    that caller alone; a caller already gone is skipped). When the outputs do
    not match the inputs one for one (a bug in run_batch), touch no future
    and return the error that fails them all."""
    try:
        count = len(outputs)
    except TypeError:  # not a sequence at all, whatever its annotation says
        count = -1
    if count != len(futures):
        return ClassifierError(f"model returned {count} results for {len(futures)} inputs")
    for future, output in zip(futures, outputs, strict=True):
        if future.done():
            continue
        if isinstance(output, Exception):
            future.set_exception(output)
        else:
            future.set_result(output)
    return None


def failure_for(cause: Exception) -> ClassifierError:
    """What one caller of a failed batch gets: a fresh exception per caller
    (one instance raised in many tasks would collect everyone's tracebacks)."""
    err: ClassifierError
    if isinstance(cause, BatcherClosed):
        err = BatcherClosed(str(cause))
    elif isinstance(cause, ClassifierError):
        err = ClassifierError(str(cause))
    else:
        err = ClassifierError(f"batch failed: {type(cause).__name__}: {cause}")
    err.__cause__ = cause
    return err


def _settle(future: asyncio.Future[Any], result: Any, exc: Exception | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
