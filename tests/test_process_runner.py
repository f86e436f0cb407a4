"""The inference process (classifier/process_runner.py, classifier/worker_process.py):
real child processes over a real socketpair, read by the event loop, killed
and stopped for real."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from batching_models import process_exited, provider_setting, write_model
from waiting import wait_until, wait_until_blocking

from classifier import worker_wire as wire
from classifier.batch_metrics import BatchStats
from classifier.config import BatcherSettings, ClassifierSettings
from classifier.process_runner import ProcessModel
from classifier.service import OnnxClassifierService
from classifier.types import Classification, ClassifierError

ECHO = "batching_models:load_echo"


def start_frame(model: Path, loader: str = ECHO) -> wire.Start:
    return wire.Start(str(model), loader, provider_setting(), 0, 1, False)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, within_s: float = 10.0) -> bool:
    try:
        wait_until_blocking(lambda: not alive(pid), within_s, interval=0.02)
    except AssertionError:
        return False
    return True


async def test_a_batch_runs_in_another_process(tmp_path: Path) -> None:
    model = ProcessModel.spawn(start_frame(write_model(tmp_path / "echo-a.onnx")), hang_timeout_s=30)
    try:
        assert model.pid is not None and model.pid != os.getpid() and alive(model.pid)
        assert model.name_version == "echo-a"
        verdicts, timing = await model.classify_batch([b"3", b"unparseable", b"5"])
    finally:
        await model.close()
    assert isinstance(verdicts[0], Classification) and verdicts[0].category == "3"
    assert isinstance(verdicts[1], ClassifierError) and "features failed" in str(verdicts[1])
    assert isinstance(verdicts[2], Classification) and verdicts[2].category == "5"
    assert timing.model_s > 0
    assert model.pid is None


def test_start_failures_say_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(ClassifierError, match="cannot load model"):
        ProcessModel.spawn(start_frame(broken), hang_timeout_s=30)
    with pytest.raises(ClassifierError, match="no_such_module"):
        ProcessModel.spawn(start_frame(broken, "no_such_module:load"), hang_timeout_s=30)
    with pytest.raises(ClassifierError, match="not 'module:function'"):
        ProcessModel.spawn(start_frame(broken, "nonsense"), hang_timeout_s=30)


async def test_a_process_killed_between_batches_is_replaced_before_the_next(tmp_path: Path) -> None:
    model = ProcessModel.spawn(start_frame(write_model(tmp_path / "m.onnx")), hang_timeout_s=30)
    try:
        first = model.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until_blocking(lambda: process_exited(first), what="the killed inference process is gone")
        # Noticed before the batch is sent: the batch is not lost.
        verdicts, _ = await model.classify_batch([b"2"])
        assert isinstance(verdicts[0], Classification) and verdicts[0].category == "2"
        assert model.pid not in (None, first)
        assert wait_gone(first)
    finally:
        await model.close()


async def test_a_hung_process_is_killed_and_replaced(tmp_path: Path) -> None:
    model = ProcessModel.spawn(start_frame(write_model(tmp_path / "m.onnx")), hang_timeout_s=0.5)
    try:
        first = model.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ClassifierError, match="hung"):
            await model.classify_batch([b"1"])
        assert time.monotonic() - t0 < 5
        assert wait_gone(first)
        verdicts, _ = await model.classify_batch([b"7"])
        assert isinstance(verdicts[0], Classification) and verdicts[0].category == "7"
    finally:
        await model.close()


async def test_the_process_exits_when_triaged_goes_away(tmp_path: Path) -> None:
    model = ProcessModel.spawn(start_frame(write_model(tmp_path / "m.onnx")), hang_timeout_s=30)
    pid = model.pid
    assert pid is not None
    # What the child sees when triaged is SIGKILLed: its socket end closes.
    assert model._sock is not None
    model._sock.close()
    assert wait_gone(pid)
    await model.close()


async def test_sigterm_to_the_process_group_is_left_to_triaged(tmp_path: Path) -> None:
    # systemd signals the whole cgroup on stop; the child must keep serving
    # until triaged has drained and sends Stop.
    model = ProcessModel.spawn(start_frame(write_model(tmp_path / "m.onnx")), hang_timeout_s=30)
    try:
        assert model.pid is not None
        os.kill(model.pid, signal.SIGTERM)
        verdicts, _ = await model.classify_batch([b"4"])
        assert isinstance(verdicts[0], Classification) and verdicts[0].category == "4"
    finally:
        await model.close()


def process_service(model: Path, stats: BatchStats | None = None) -> OnnxClassifierService:
    s = ClassifierSettings(model_path=str(model), provider=provider_setting(),  # type: ignore[arg-type]
                           timeout_ms=30_000, runner="process",
                           batcher=BatcherSettings(max_batch_size=8))
    return OnnxClassifierService(s, metrics=stats, loader=ECHO)


async def test_service_survives_a_crashed_inference_process(tmp_path: Path) -> None:
    stats = BatchStats()
    service = process_service(write_model(tmp_path / "m.onnx", heavy_layers=8), stats)
    await service.start()
    try:
        runner = service.runner
        assert isinstance(runner, ProcessModel) and runner.pid is not None
        first = runner.pid
        load = [asyncio.create_task(service.classify(b"%d" % i)) for i in range(200)]
        await wait_until(lambda: stats.items >= 40, 30, interval=0.005)
        os.kill(first, signal.SIGKILL)
        results = await asyncio.gather(*load, return_exceptions=True)
        after = await asyncio.gather(*(service.classify(b"%d" % i) for i in range(50)))
        restarted = runner.pid
    finally:
        await service.close()
    # The batch the process died on was run again, one message at a time, in
    # a fresh process (none of its messages was the cause): nothing is lost.
    assert [r.category if isinstance(r, Classification) else r for r in results] == [
        str(i) for i in range(200)]
    assert [r.category for r in after] == [str(i) for i in range(50)]
    assert restarted not in (None, first)


async def test_hot_swap_stops_the_old_process_and_close_stops_the_new(tmp_path: Path) -> None:
    old = write_model(tmp_path / "echo-old.onnx")
    new = write_model(tmp_path / "echo-new.onnx", offset=1000.0)
    service = process_service(old)
    await service.start()
    try:
        first = service.runner
        assert isinstance(first, ProcessModel) and first.pid is not None
        old_pid = first.pid
        assert await service.reload(str(new)) == "echo-new"
        assert (await service.classify(b"9")).model == "echo-new"
        second = service.runner
        assert isinstance(second, ProcessModel) and second.pid is not None
        new_pid = second.pid
        assert await asyncio.to_thread(wait_gone, old_pid)
        assert alive(new_pid)
    finally:
        await service.close()
    assert await asyncio.to_thread(wait_gone, new_pid)


def test_the_process_runner_takes_its_loader_by_name(tmp_path: Path) -> None:
    from batching_models import load_echo

    s = ClassifierSettings(model_path=str(write_model(tmp_path / "m.onnx")), runner="process")
    with pytest.raises(ValueError, match="module:function"):
        OnnxClassifierService(s, loader=load_echo)


async def test_a_message_that_crashes_the_process_fails_alone(tmp_path: Path) -> None:
    from batching_models import CRASH_HEADER, tiny_message, train_tiny_model

    tiny = train_tiny_model(tmp_path, tmp_path / "tiny.onnx", name="tiny")
    start = wire.Start(str(tiny), "batching_models:load_crashing_model", "cpu", 0, 1, False)
    model = ProcessModel.spawn(start, hang_timeout_s=30)
    raws = [tiny_message("primary", 1), CRASH_HEADER + b"\r\n" + tiny_message("updates", 2),
            tiny_message("forums", 3)]
    try:
        first = model.pid
        verdicts, timing = await model.classify_batch(raws)
        assert model.pid not in (None, first)
    finally:
        await model.close()
    assert isinstance(verdicts[0], Classification) and verdicts[0].category == "primary"
    assert isinstance(verdicts[1], ClassifierError) and "SIGKILL" in str(verdicts[1])
    assert isinstance(verdicts[2], Classification) and verdicts[2].category == "forums"
    assert timing.model_s > 0


def out_of_step_model(tmp_path: Path) -> ProcessModel:
    """An inference process whose model writes frames out of turn (batching_models)."""
    loader = "batching_models:load_out_of_step_echo"
    return ProcessModel.spawn(start_frame(write_model(tmp_path / "m.onnx"), loader), hang_timeout_s=30)


async def test_a_frame_between_batches_restarts_the_process_and_the_next_batch_is_not_lost(
    tmp_path: Path,
) -> None:
    from batching_models import STRAY_AFTER

    model = out_of_step_model(tmp_path)
    try:
        first = model.pid
        verdicts, _ = await model.classify_batch([STRAY_AFTER])
        assert isinstance(verdicts[0], Classification)
        await asyncio.sleep(1.0)  # the stray frame arrives while no batch is out
        # Nothing of this batch was sent to the out-of-step process: a fresh one
        # answers it, rather than the batch failing.
        verdicts, _ = await model.classify_batch([b"4"])
        assert isinstance(verdicts[0], Classification) and verdicts[0].category == "4"
        assert model.pid not in (None, first)
        assert wait_gone(first)  # type: ignore[arg-type]
    finally:
        await model.close()


async def test_a_wrong_frame_as_the_answer_kills_the_process_and_fails_only_that_batch(
    tmp_path: Path,
) -> None:
    from batching_models import WRONG_ANSWER

    model = out_of_step_model(tmp_path)
    try:
        first = model.pid
        with pytest.raises(ClassifierError, match="out of step"):
            await model.classify_batch([WRONG_ANSWER, b"3"])
        assert wait_gone(first)  # type: ignore[arg-type]
        # The real answer it sent after the stray frame died with it: the next
        # batch gets its own answer from a fresh process, not the stale one.
        verdicts, _ = await model.classify_batch([b"6", b"8"])
        assert [v.category for v in verdicts if isinstance(v, Classification)] == ["6", "8"]
        assert model.pid not in (None, first)
    finally:
        await model.close()
