"""The micro-batchers with real ONNX models, real threads and a real event loop.

Both batchers keep the same promises, so most tests run on each: "thread"
(classifier/batcher.py, run_batch in its worker thread) and "loop"
(classifier/loop_batcher.py, run_batch awaited on the loop; here it awaits the
same gated runner in a thread, as the service awaits the inference process).
Timing never decides a test: a gate in the runner holds a batch while the
test arranges the queue, and close reasons are asserted, not latencies.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from batching_models import EchoRunner, build_echo_model

from classifier.batch_metrics import BatchStats
from classifier.batcher import Batcher, BatcherClosed
from classifier.config import BatcherSettings
from classifier.loop_batcher import LoopBatcher
from classifier.types import ClassifierError, DeadlineExceeded, Overloaded

FAST = build_echo_model()
SLOW = build_echo_model(heavy_layers=24, heavy_dim=256)


AnyBatcher = Batcher[int, int] | LoopBatcher[int, int]


@pytest.fixture(params=["thread", "loop"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(
    runner: EchoRunner, *, kind: str = "thread", max_batch_size: int = 64,
    max_wait_ms: float = 2.0, queue_size: int = 4096, timeout_ms: float = 10_000,
) -> tuple[AnyBatcher, BatchStats]:
    stats = BatchStats()
    settings = BatcherSettings(
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, queue_size=queue_size
    )
    if kind == "loop":
        async def run_batch(items: list[int]) -> list[int | Exception]:
            return await asyncio.to_thread(runner, items)

        return LoopBatcher(run_batch, settings, timeout_ms=timeout_ms, metrics=stats), stats
    return Batcher(runner, settings, timeout_ms=timeout_ms, metrics=stats), stats


@asynccontextmanager
async def started_batcher(runner: EchoRunner, **kw: Any) -> AsyncIterator[tuple[AnyBatcher, BatchStats]]:
    """A started batcher (see `make`), closed when the block ends."""
    batcher, stats = make(runner, **kw)
    await batcher.start()
    try:
        yield batcher, stats
    finally:
        await batcher.close()


async def hold_worker(batcher: AnyBatcher, runner: EchoRunner, item: int) -> asyncio.Task[int]:
    """Start a batch of one item and keep the worker busy with it (gate closed)."""
    runner.gate.clear()
    runner.entered.clear()
    task = asyncio.create_task(batcher.submit(item))
    assert await asyncio.to_thread(runner.entered.wait, 10)
    return task


async def settle() -> None:
    """Let submitted tasks reach the queue."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_64_concurrent_callers_share_batches_and_get_their_own_result(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind, max_batch_size=16) as (batcher, stats):
        results = await asyncio.gather(*(batcher.submit(i) for i in range(64)))
    assert results == list(range(64))
    assert sorted(runner.ran) == list(range(64))
    assert max(len(b) for b in runner.batches) == 16
    assert stats.close_reasons["full"] == 4


async def test_batches_form_while_the_worker_is_busy(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind, max_batch_size=64, max_wait_ms=0) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(63)]
        await settle()
        assert batcher.depth == 63
        runner.gate.set()
        assert await first == 1000
        assert await asyncio.gather(*rest) == list(range(63))
    assert runner.batches == [[1000], list(range(63))]
    assert list(stats.batch_sizes) == [1, 63]


async def test_slow_model_under_staggered_load_batches(kind: str) -> None:
    runner = EchoRunner(SLOW)
    batcher, stats = make(runner, kind=kind, max_batch_size=64)
    await batcher.start()

    async def caller(i: int) -> int:
        await asyncio.sleep(i * 0.0005)
        return await batcher.submit(i)

    try:
        results = await asyncio.gather(*(caller(i) for i in range(64)))
    finally:
        await batcher.close()
    assert results == list(range(64))
    assert max(stats.batch_sizes) > 1
    assert stats.items == 64


async def test_lone_request_does_not_wait_out_the_window(kind: str) -> None:
    runner = EchoRunner(FAST)
    # A window of a full second: a lone request that waited it out would be
    # closed by "timeout"; the fast path closes it as "idle".
    async with started_batcher(runner, kind=kind, max_wait_ms=1000) as (batcher, stats):
        assert await batcher.submit(7) == 7
        assert await batcher.submit(8) == 8
    assert dict(stats.close_reasons) == {"idle": 2}


async def test_cancelled_callers_leave_others_correct(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        queued = {i: asyncio.create_task(batcher.submit(i)) for i in range(20)}
        await settle()
        for i in range(0, 20, 2):
            queued[i].cancel()
        await settle()
        runner.gate.set()
        assert await first == 1000
        for i, task in queued.items():
            if i % 2:
                assert await task == i
            else:
                with pytest.raises(asyncio.CancelledError):
                    await task
        # Cancelled while queued: never run.
        assert runner.ran == [1000, *range(1, 20, 2)]

        # Cancelled while their batch runs: the batch completes for the rest.
        running = {i: asyncio.create_task(batcher.submit(i)) for i in range(100, 110)}
        runner.gate.clear()
        runner.entered.clear()
        await settle()
        assert await asyncio.to_thread(runner.entered.wait, 10)
        for i in range(100, 110, 3):
            running[i].cancel()
        runner.gate.set()
        for i, task in running.items():
            if (i - 100) % 3:
                assert await task == i
            else:
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert runner.batches[-1] == list(range(100, 110))
        assert await batcher.submit(5) == 5
    assert stats.errors == 0


async def test_expired_requests_are_not_run(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        doomed = [asyncio.create_task(batcher.submit(i, timeout_ms=20)) for i in range(5)]
        for task in doomed:
            with pytest.raises(DeadlineExceeded):
                await task
        runner.gate.set()
        assert await first == 1000
        assert await batcher.submit(42) == 42
    assert runner.ran == [1000, 42]
    assert stats.timeouts == 5


async def test_deadline_while_running_answers_the_caller_and_spares_the_batch(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind) as (batcher, stats):
        runner.gate.clear()
        runner.entered.clear()
        short = asyncio.create_task(batcher.submit(1, timeout_ms=20))
        long = asyncio.create_task(batcher.submit(2))
        assert await asyncio.to_thread(runner.entered.wait, 10)
        with pytest.raises(DeadlineExceeded):
            await short
        runner.gate.set()
        assert await long == 2
    assert runner.batches == [[1, 2]]
    assert stats.timeouts == 1


async def test_full_queue_answers_overloaded_at_once(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind, queue_size=4) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        queued = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
        await settle()
        assert batcher.depth == 4
        refused = asyncio.create_task(batcher.submit(99))
        await asyncio.sleep(0)
        # Refused in its first step, while the worker is still held.
        assert refused.done() and not runner.gate.is_set()
        with pytest.raises(Overloaded):
            await refused
        runner.gate.set()
        assert await first == 1000
        assert await asyncio.gather(*queued) == [0, 1, 2, 3]
    assert stats.overloads == 1
    assert 99 not in runner.ran


async def test_cancelled_callers_free_their_queue_slots(kind: str) -> None:
    runner = EchoRunner(FAST)
    async with started_batcher(runner, kind=kind, queue_size=2) as (batcher, _):
        first = await hold_worker(batcher, runner, 1000)
        gone = [asyncio.create_task(batcher.submit(i)) for i in range(2)]
        await settle()
        for task in gone:
            task.cancel()
        await settle()
        late = asyncio.create_task(batcher.submit(3))
        await settle()
        runner.gate.set()
        assert await first == 1000
        assert await late == 3


async def test_exception_reaches_exactly_that_batch(kind: str) -> None:
    runner = EchoRunner(FAST)
    runner.poison = {13}
    async with started_batcher(runner, kind=kind) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        doomed = [asyncio.create_task(batcher.submit(i)) for i in (12, 13, 14)]
        await settle()
        runner.gate.set()
        assert await first == 1000
        for task in doomed:
            with pytest.raises(ClassifierError, match="poisoned"):
                await task
        assert await batcher.submit(15) == 15
    assert runner.batches == [[1000], [12, 13, 14], [15]]
    assert stats.errors == 1


async def test_output_count_mismatch_fails_the_batch(kind: str) -> None:
    runner = EchoRunner(FAST)
    runner.short = {3}
    async with started_batcher(runner, kind=kind) as (batcher, stats):
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, ClassifierError) and "4 results for 5" in str(r)
                   for r in results)
        assert await batcher.submit(9) == 9
    assert stats.errors == 1


async def test_per_item_error_fails_only_that_caller(kind: str) -> None:
    runner = EchoRunner(FAST)
    runner.bad_item = {2}
    async with started_batcher(runner, kind=kind) as (batcher, _):
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)),
                                       return_exceptions=True)
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], ValueError)
    assert len(runner.batches) == 1


async def test_close_drains_queued_requests(kind: str) -> None:
    runner = EchoRunner(FAST)
    batcher, _ = make(runner, kind=kind)
    await batcher.start()
    first = await hold_worker(batcher, runner, 1000)
    queued = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await settle()
    closing = asyncio.create_task(batcher.close())
    await settle()
    with pytest.raises(BatcherClosed):
        await batcher.submit(50)
    runner.gate.set()
    await closing
    assert await first == 1000
    assert await asyncio.gather(*queued) == [0, 1, 2]
    assert not batcher.running


async def test_close_without_drain_fails_queued_requests(kind: str) -> None:
    runner = EchoRunner(FAST)
    batcher, _ = make(runner, kind=kind)
    await batcher.start()
    first = await hold_worker(batcher, runner, 1000)
    queued = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await settle()
    closing = asyncio.create_task(batcher.close(drain=False))
    await settle()
    runner.gate.set()
    await closing
    assert await first == 1000  # the running batch still completes
    for task in queued:
        with pytest.raises(BatcherClosed):
            await task
    assert runner.ran == [1000]


async def test_window_closes_a_batch_while_requests_keep_arriving(kind: str) -> None:
    runner = EchoRunner(FAST)
    # Requests keep coming on every pass of the loop, so the "idle" rule never
    # fires; the max_wait_ms window must still close the batch. The queue is
    # made big enough for however long a slow machine takes to hand the worker
    # the GIL (a full queue is another test's subject).
    batcher, stats = make(runner, kind=kind, max_batch_size=4096, max_wait_ms=20, queue_size=1_000_000)
    await batcher.start()
    runner.entered.clear()
    tasks: list[asyncio.Task[int]] = []
    try:
        i = 0
        while not runner.entered.is_set() and i < 100_000:
            tasks.append(asyncio.create_task(batcher.submit(i)))
            tasks.append(asyncio.create_task(batcher.submit(i + 1)))
            i += 2
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
    finally:
        await batcher.close()
    assert results == list(range(len(tasks)))
    assert stats.close_reasons["timeout"] >= 1
    assert runner.batches[0] and len(runner.batches[0]) > 2


async def test_a_blocked_event_loop_does_not_hold_up_the_next_batch() -> None:
    runner = EchoRunner(FAST)
    # A window of a full second, and a loop that cannot answer the worker's
    # "anything more coming?" probe: the batch must still close, in the worker,
    # when the window ends, without the loop ever getting a turn.
    async with started_batcher(runner, max_wait_ms=1000) as (batcher, stats):
        first = await hold_worker(batcher, runner, 1000)
        queued = asyncio.create_task(batcher.submit(5))
        await settle()
        assert batcher.depth == 1
        runner.entered.clear()
        runner.gate.set()
        # Block the loop thread, as a long feature extraction would. With the
        # collector on the loop this never returned True.
        assert runner.entered.wait(10)
        assert await first == 1000
        assert await queued == 5
    assert runner.batches == [[1000], [5]]
    assert stats.close_reasons["timeout"] == 1


async def test_run_in_worker_runs_between_batches(kind: str) -> None:
    runner = EchoRunner(FAST)
    # The thread batcher runs calls in its worker thread, the loop batcher on the loop.
    where = "triaged-infer" if kind == "thread" else threading.current_thread().name
    async with started_batcher(runner, kind=kind) as (batcher, _):
        first = await hold_worker(batcher, runner, 1000)
        names = asyncio.create_task(batcher.run_in_worker(lambda: threading.current_thread().name))
        boom = asyncio.create_task(batcher.run_in_worker(lambda: 1 // 0))
        await settle()
        assert not names.done()  # the running batch goes first
        runner.gate.set()
        assert await first == 1000
        assert await names == where
        with pytest.raises(ZeroDivisionError):
            await boom
        assert await batcher.submit(3) == 3
    with pytest.raises(BatcherClosed):
        await batcher.run_in_worker(lambda: None)
