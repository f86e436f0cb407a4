"""A generic micro-batcher: many concurrent callers, one model call per batch.

Shape (after Triton's dynamic batcher and Ray Serve's @serve.batch, with the
safety they lack):

- A bounded queue. `submit()` on a full queue raises Overloaded at once; it
  never waits for room.
- One collector task forms batches, and one worker thread runs them
  (onnxruntime releases the GIL, so the event loop keeps serving sockets).
  Only one batch runs at a time; requests that arrive meanwhile queue up, so
  batches form naturally under load.
- When the worker is free, the collector takes what is queued (up to
  max_batch_size) and then keeps collecting only while requests keep arriving
  and the first request has waited less than max_wait_ms. If a pass of the
  event loop brings no new request, the batch closes at once ("idle"): a lone
  request under light load pays no batching window at all.
- Every request has a deadline. A queued request whose deadline passed is
  never run (DeadlineExceeded); a caller whose deadline passes while its batch
  runs gets DeadlineExceeded and the result is dropped.
- Results and errors are set only on futures that are not done, so a caller
  that was cancelled (or timed out) never breaks its batch or anyone else.
- The outputs are counted against the inputs; a mismatch or an exception in
  `run_batch` fails exactly that batch's callers, and the next batch runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from classifier.batch_metrics import BatcherMetrics, CloseReason, NullMetrics
from classifier.config import BatcherSettings
from classifier.types import ClassifierError, DeadlineExceeded, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

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
    enqueued: float  # loop.time()
    deadline: float  # loop.time()
    # perf_counter() at submit, for the queue-wait metric: uvloop's loop.time()
    # ticks in whole milliseconds.
    submitted: float


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
        self._queue: deque[_Request[In, Out]] = deque()
        self._arrived = asyncio.Event()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closing = False
        self._arrivals = 0  # submits so far: the collector's "is more coming?" probe

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._collector is not None and not self._collector.done()

    async def start(self) -> None:
        if self._collector is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=self._thread_name
        )
        self._collector = asyncio.create_task(self._collect(), name="batcher-collector")

    async def run_in_worker(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the inference thread, between batches (warm-ups, probes)."""
        if self._executor is None:
            raise BatcherClosed("batcher not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def check_room(self) -> None:
        """Raise BatcherClosed or Overloaded now if a submit would; callers
        that prepare an item (features) check first so a refusal costs nothing."""
        if self._closing or self._collector is None:
            raise BatcherClosed("classifier is not running")
        if len(self._queue) >= self._settings.queue_size:
            self._purge_done()
            if len(self._queue) >= self._settings.queue_size:
                self._metrics.overload()
                raise Overloaded("classifier queue full")

    async def submit(self, item: In, *, timeout_ms: float | None = None) -> Out:
        """Queue `item` and wait for its result.

        Raises Overloaded at once when the queue is full, DeadlineExceeded when
        the deadline (timeout_ms, else the batcher's) passes first, and
        ClassifierError when its batch failed.
        """
        self.check_room()
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout_s = self._timeout_s if timeout_ms is None else timeout_ms / 1000.0
        request: _Request[In, Out] = _Request(
            item, loop.create_future(), now, now + timeout_s, time.perf_counter()
        )
        self._queue.append(request)
        self._arrivals += 1
        self._arrived.set()
        self._metrics.queue_depth(len(self._queue))
        try:
            async with asyncio.timeout_at(request.deadline):
                # Awaiting the future directly: if this caller is cancelled the
                # future is cancelled too, and the collector skips it.
                return await request.future
        except TimeoutError:
            self._metrics.timeout()
            raise DeadlineExceeded(f"no verdict within {timeout_s * 1000:.0f} ms") from None

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking requests; run what is queued (drain) or fail it, then stop.

        Draining is bounded: every queued request has a deadline.
        """
        self._closing = True
        if not drain:
            self._fail_queued(BatcherClosed("classifier shut down"))
        self._arrived.set()
        if self._collector is not None:
            try:
                await self._collector
            finally:
                self._collector = None
        if self._executor is not None:
            # The collector waited for its last batch, so nothing runs now.
            self._executor.shutdown(wait=False)
            self._executor = None

    # -- collector ---------------------------------------------------------

    async def _collect(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch, reason = await self._form_batch()
            if not batch:
                continue
            try:
                await self._run(batch, reason)
            except Exception as exc:  # a bug here must not strand the callers
                self._fail(batch, exc)

    async def _form_batch(self) -> tuple[list[_Request[In, Out]], CloseReason]:
        loop = asyncio.get_running_loop()
        max_size = self._settings.max_batch_size
        batch: list[_Request[In, Out]] = []
        self._take(batch, loop.time())
        if not batch:
            return batch, "idle"
        # The window runs on perf_counter, not loop.time(): uvloop caches the
        # loop time once per iteration, so on a busy loop (features, SMTP) a
        # window measured in loop time overshoots by a whole pass.
        window_end = batch[0].submitted + self._settings.max_wait_ms / 1000.0
        while True:
            if len(batch) >= max_size:
                return batch, "full"
            if self._closing:
                return batch, "drain"
            if time.perf_counter() >= window_end:
                return batch, "timeout"
            # Let one pass of the event loop run: callers whose sockets are
            # ready right now get to submit. If none did, nothing is coming
            # soon enough to be worth waiting for: run now.
            seen = self._arrivals
            await asyncio.sleep(0)
            if self._arrivals == seen:
                return batch, "idle"
            self._take(batch, loop.time())

    def _take(self, batch: list[_Request[In, Out]], now: float) -> None:
        """Move live requests from the queue into `batch`, expiring stale ones."""
        max_size = self._settings.max_batch_size
        while self._queue and len(batch) < max_size:
            request = self._queue.popleft()
            if request.future.done():  # caller cancelled or timed out
                continue
            if now >= request.deadline:
                # Never run a request nobody will wait for.
                request.future.set_exception(DeadlineExceeded("deadline passed in queue"))
                self._metrics.timeout()
                continue
            batch.append(request)

    async def _run(self, batch: list[_Request[In, Out]], reason: CloseReason) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        # Requests may have been cancelled during the collection window.
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        self._metrics.batch(len(live), reason)
        self._metrics.queue_depth(len(self._queue))
        for request in live:
            self._metrics.queue_wait(start - request.submitted)
        items = [r.item for r in live]
        assert self._executor is not None
        try:
            outputs, elapsed, cpu = await loop.run_in_executor(self._executor, self._timed, items)
        except Exception as exc:  # run_batch raised: fail exactly this batch
            self._metrics.error(len(live))
            self._fail(live, exc)
            return
        self._metrics.inference(elapsed, len(live), cpu)
        if len(outputs) != len(live):
            self._metrics.error(len(live))
            self._fail(
                live,
                ClassifierError(f"model returned {len(outputs)} results for {len(live)} inputs"),
            )
            return
        for request, output in zip(live, outputs, strict=True):
            if request.future.done():
                continue
            if isinstance(output, Exception):
                request.future.set_exception(output)
            else:
                request.future.set_result(output)

    def _timed(self, items: list[In]) -> tuple[Sequence[Out | Exception], float, float]:
        # Runs in the worker thread: wall time and this thread's CPU time.
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = self._run_batch(items)
        return outputs, time.perf_counter() - t0, time.thread_time() - c0

    def _fail(self, batch: list[_Request[In, Out]], cause: Exception) -> None:
        for request in batch:
            if request.future.done():
                continue
            # A fresh exception per caller: one instance raised in many tasks
            # would collect everyone's tracebacks.
            if isinstance(cause, ClassifierError):
                err = ClassifierError(str(cause))
            else:
                err = ClassifierError(f"batch failed: {type(cause).__name__}: {cause}")
            err.__cause__ = cause
            request.future.set_exception(err)

    def _fail_queued(self, exc: ClassifierError) -> None:
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(type(exc)(*exc.args))

    def _purge_done(self) -> None:
        # Only on a full queue: drop entries of callers who already left, so
        # they do not hold slots against live callers.
        self._queue = deque(r for r in self._queue if not r.future.done())
