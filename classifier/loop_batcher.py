"""The micro-batcher for runners that are awaited on the event loop.

classifier/batcher.py batches in a worker thread, for runners that block
(the model in this process, or the features computed here for the shared
inference service). A runner whose work happens in another process (the
inference process, classifier/process_runner.py) needs no thread: its batch
is one socket write and its answer one read, both on the loop. Batching on
the loop spares every batch the thread's hand-offs with the SMTP loop
(condition variable, call_soon_threadsafe, the GIL: ~0.06-0.08 ms of CPU per
message at 1-3 messages per batch, bench/results/cpu_profile.md).

Same promises as the thread batcher:

- A bounded queue: `submit()` on a full queue raises Overloaded at once.
- One batch runs at a time; requests that arrive meanwhile queue, so batches
  form under load. When the runner is free the dispatcher takes what is
  queued (up to max_batch_size), then keeps collecting only while each pass
  of the loop brings new requests and the first has waited less than
  max_wait_ms: a lone request pays no window at all ("idle").
- Every request has a deadline, kept by a loop timer: a request whose
  deadline passes gets DeadlineExceeded at once, whether it is queued (it is
  then never run) or its batch is running (its result is dropped).
- A caller that is cancelled never breaks its batch or anyone else's.
- Outputs are counted against inputs; a mismatch or an exception fails
  exactly that batch's callers, and the next batch runs.

The price: collection is a coroutine, so a loop blocked by other work delays
the next batch. With features and the model in the inference process the
loop runs only SMTP, which never blocks it for long.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from classifier.batch_metrics import BatcherMetrics, CloseReason, NullMetrics
from classifier.batcher import BatcherClosed, Call, failure_for, hand_out
from classifier.config import BatcherSettings
from classifier.types import DeadlineExceeded, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

# As the thread batcher's RunBatch, awaited: an item may be answered with an
# Exception instance, which fails that item's caller alone.
AsyncRunBatch = Callable[[list[In]], Awaitable[Sequence[Out | Exception]]]


@dataclass(eq=False, slots=True)
class _Request(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    submitted: float  # perf_counter(): the window and the queue-wait metric


class LoopBatcher(Generic[In, Out]):
    """Batches `submit()` calls into awaited `run_batch(list_of_items)` calls."""

    def __init__(
        self,
        run_batch: AsyncRunBatch[In, Out],
        settings: BatcherSettings,
        *,
        timeout_ms: float,
        metrics: BatcherMetrics | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._settings = settings
        self._timeout_s = timeout_ms / 1000.0
        self._metrics: BatcherMetrics = metrics if metrics is not None else NullMetrics()
        self._queue: deque[_Request[In, Out]] = deque()
        self._calls: deque[Call[Any]] = deque()
        self._arrivals = 0  # submits so far: "did this pass bring more?"
        self._closing = False
        self._wakeup: asyncio.Future[None] | None = None  # set while the dispatcher idles
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the running batch)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._dispatch(), name="triaged-batcher"
            )

    async def run_in_worker(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop between batches (probes: "is the dispatcher
        alive and getting to its queue?")."""
        if self._task is None or self._task.done() or self._closing:
            raise BatcherClosed("batcher not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        call = Call(fn, future)
        self._calls.append(call)
        self._wake()
        return await future

    async def submit(self, item: In, *, timeout_ms: float | None = None) -> Out:
        """Queue `item` and wait for its result.

        Raises Overloaded at once when the queue is full, DeadlineExceeded when
        the deadline (timeout_ms, else the batcher's) passes first, and
        ClassifierError when its batch failed.
        """
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosed("classifier is not running")
        queue = self._queue
        if len(queue) >= self._settings.queue_size:
            # Drop entries of callers who already left, so they do not hold
            # slots against live callers.
            self._queue = queue = deque(r for r in queue if not r.future.done())
            if len(queue) >= self._settings.queue_size:
                self._metrics.overload()
                raise Overloaded("classifier queue full")
        loop = asyncio.get_running_loop()
        timeout_s = self._timeout_s if timeout_ms is None else timeout_ms / 1000.0
        future: asyncio.Future[Out] = loop.create_future()
        queue.append(_Request(item, future, time.perf_counter()))
        self._arrivals += 1
        self._metrics.queue_depth(len(queue))
        self._wake()
        # One timer per request, cancelled with the answer: cheaper than
        # asyncio.timeout() (a context manager and a task check per await).
        timer = loop.call_later(timeout_s, self._expire, future, timeout_s)
        try:
            # Awaiting the future directly: a cancelled caller cancels it, and
            # the dispatcher skips it.
            return await future
        finally:
            timer.cancel()

    async def close(self, *, drain: bool = True) -> None:
        """Stop taking requests; run what is queued (drain) or fail it, then stop.

        Draining is bounded: every queued request has a deadline.
        """
        self._closing = True
        if not drain:
            dropped, self._queue = list(self._queue), deque()
            _fail(dropped, BatcherClosed("classifier shut down"))
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.shield(task)

    # -- the dispatcher (a task on the loop) -----------------------------------

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _expire(self, future: asyncio.Future[Out], timeout_s: float) -> None:
        if not future.done():
            future.set_exception(DeadlineExceeded(f"no verdict within {timeout_s * 1000:.0f} ms"))
            self._metrics.timeout()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._calls:
                    self._run_call(self._calls.popleft())
                    continue
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup = loop.create_future()
                    try:
                        await self._wakeup
                    finally:
                        self._wakeup = None
                    continue
                batch, reason = await self._collect()
                if batch:
                    try:
                        await self._run(batch, reason)
                    except Exception as exc:  # a bug here must not strand the callers
                        _fail(batch, exc)
        finally:
            left: list[_Request[In, Out] | Call[Any]] = [*self._queue, *self._calls]
            self._queue.clear()
            self._calls.clear()
            _fail(left, BatcherClosed("classifier worker stopped"))

    async def _collect(self) -> tuple[list[_Request[In, Out]], CloseReason]:
        max_size = self._settings.max_batch_size
        batch: list[_Request[In, Out]] = []
        self._take(batch)
        if not batch:
            return batch, "idle"
        window_end = batch[0].submitted + self._settings.max_wait_ms / 1000.0
        while True:
            if len(batch) >= max_size:
                return batch, "full"
            if self._closing:
                return batch, "drain"
            if time.perf_counter() >= window_end:
                return batch, "timeout"
            if self._queue:
                self._take(batch)
                continue
            seen = self._arrivals
            await asyncio.sleep(0)  # one pass of the loop: do more requests come?
            if self._arrivals == seen:
                return batch, "idle"

    def _take(self, batch: list[_Request[In, Out]]) -> None:
        """Move live requests from the queue into `batch` (expired and
        cancelled ones are done already and left behind)."""
        queue, max_size = self._queue, self._settings.max_batch_size
        while queue and len(batch) < max_size:
            request = queue.popleft()
            if not request.future.done():
                batch.append(request)

    async def _run(self, batch: list[_Request[In, Out]], reason: CloseReason) -> None:
        # Requests may have expired or been cancelled during the window.
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        metrics = self._metrics
        start = time.perf_counter()
        metrics.batch(len(live), reason)
        metrics.queue_depth(len(self._queue))
        for r in live:
            metrics.queue_wait(start - r.submitted)
        try:
            outputs = await self._run_batch([r.item for r in live])
        except Exception as exc:  # run_batch raised: fail exactly this batch
            metrics.error(len(live))
            _fail(live, exc)
            return
        # The work ran elsewhere: this process spent only the round trip.
        metrics.inference(time.perf_counter() - start, len(live))
        mismatch = hand_out([r.future for r in live], outputs)
        if mismatch is not None:
            metrics.error(len(live))
            _fail(live, mismatch)

    def _run_call(self, call: Call[Any]) -> None:
        if call.future.done():
            return
        try:
            call.future.set_result(call.fn())
        except Exception as exc:
            call.future.set_exception(exc)


def _fail(requests: Sequence[_Request[Any, Any] | Call[Any]], cause: Exception) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(failure_for(cause))


__all__ = ["AsyncRunBatch", "LoopBatcher"]
