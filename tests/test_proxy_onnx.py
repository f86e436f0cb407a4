"""The proxy with the ONNX classifier, end to end over real sockets.

A tiny model is trained here through the real `triaged train` (seconds), so
these tests do not depend on models/default.onnx. They check that the verdict
stamped into the relayed message is the model's, that the batcher's metrics
reach prometheus, that a full classifier queue and a crashing inference
process map to the failure policy, and that SIGHUP swaps the model of a
running `triaged serve` with mail flowing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from collections.abc import Sequence
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import msgspec
import numpy as np
import onnx
import pytest
from batching_models import (
    CRASH_HEADER,
    EchoModel,
    process_exited,
    tiny_message,
    train_tiny_model,
    write_model,
)
from conftest import CaptureServer, SmtpTestClient, StartTriaged, base_settings
from triaged_proc import TriagedProcess, serve_toml
from waiting import wait_until

from classifier.batch_metrics import BatchStats
from classifier.config import BatcherSettings, ClassifierSettings
from classifier.inference import BatchModel
from classifier.model import MANIFEST_KEY, load_model
from classifier.providers import ProviderChoice
from classifier.service import FALLBACK_MODEL, OnnxClassifierService
from classifier.types import Classification
from proxy.server import Server
from proxy.settings import Settings

ENVELOPE = ("sender@example.org", ["rcpt@example.net"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    return train_tiny_model(work, work / "tiny.onnx", name="tiny", version="1")


def with_version(src: Path, dst: Path, version: str) -> Path:
    """The same weights under another manifest version (X-Triage-Model differs)."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            prop.value = prop.value.replace('"version":"1"', f'"version":"{version}"', 1)
            assert f'"version":"{version}"' in prop.value
    onnx.save(model, str(dst))
    return dst


def headers_of(data: bytes) -> dict[str, str]:
    msg = BytesParser(policy=compat32).parsebytes(data, headersonly=True)
    return {k.lower(): str(v) for k, v in msg.items()}


async def client_for(host: str, port: int) -> SmtpTestClient:
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


def onnx_section(model: Path, **changes: object) -> dict[str, object]:
    return {"kind": "onnx", "model_path": str(model), "provider": "cpu", "rule_overrides": False,
            "timeout_ms": 30_000.0, **changes}


async def start_onnx_server(capture: CaptureServer, model: Path, **changes: object) -> Server:
    """The real Server building its own classifier from settings (kind onnx)."""
    settings = base_settings(capture.url)
    cs = msgspec.structs.replace(settings.classifier, **onnx_section(model, **changes))
    srv = Server(msgspec.structs.replace(settings, classifier=cs))
    await srv.start()
    return srv


async def test_server_stamps_the_models_verdict(capture: CaptureServer, tiny: Path) -> None:
    srv = await start_onnx_server(capture, tiny)
    try:
        await _stamps_the_models_verdict(srv, capture, tiny)
    finally:
        await srv.stop(drain_timeout_s=1.0)


async def _stamps_the_models_verdict(srv: Server, capture: CaptureServer, tiny: Path) -> None:
    assert isinstance(srv.classifier, OnnxClassifierService)
    offline = load_model(str(tiny))
    messages = {kind: tiny_message(kind, 500 + i, seed=7) for i, kind in enumerate(
        ("primary", "updates", "forums", "spam"))}
    c = await client_for(*srv.addresses[0])
    for raw in messages.values():
        assert (await c.send_message(*ENVELOPE, raw))[0] == 250
    await c.close()
    assert len(capture.messages) == 4
    for (kind, raw), got in zip(messages.items(), capture.messages, strict=True):
        expected = offline.predict([offline.featurize(raw)])[0]
        h = headers_of(got.data)
        assert h["x-triage-model"] == "tiny/1"
        assert h["x-triage-category"] == expected.category
        assert h["x-triage-score"] == f"{expected.score:.3f}"
        assert h["x-triage-spam"] == ("yes" if expected.spam else "no")
        assert h["x-triage-spam-score"] == f"{expected.spam_score:.3f}"
        # The tiny model is sure of these; the stamp is the model's, not a default.
        assert h["x-triage-spam"] == ("yes" if kind == "spam" else "no")
        if kind != "spam":
            assert h["x-triage-category"] == kind
        assert got.data.endswith(raw.split(b"\r\n\r\n", 1)[1])  # body byte for byte
    # The batcher reports to the server's prometheus registry.
    reg = srv.metrics.registry
    assert reg.get_sample_value("triaged_classifier_batch_size_count") == 4
    assert reg.get_sample_value("triaged_classifier_features_seconds_count") == 4
    assert reg.get_sample_value("triaged_classifier_inference_seconds_count") == 4
    assert reg.get_sample_value("triaged_classifier_queue_wait_seconds_count") == 4
    assert reg.get_sample_value("triaged_classifier_overloads_total") == 0


class GatedEcho(EchoModel):
    """A real (slow) ONNX echo model whose batches wait at a gate."""

    def __init__(self, path: str) -> None:
        super().__init__(path, ["CPUExecutionProvider"])
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.warm = False

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        if self.warm:  # the service's warm-up call passes straight through
            self.entered.set()
            if not self.gate.wait(30):
                raise RuntimeError("gate never opened")
        self.warm = True
        return super().predict(batch)


async def fill_the_queue(srv: object, model: GatedEcho) -> list[asyncio.Task[tuple[int, str]]]:
    """One message held in the worker, one queued: the queue (size 1) is full."""
    service = srv.classifier  # type: ignore[attr-defined]
    host, port = srv.addresses[0]  # type: ignore[attr-defined]
    held = [await client_for(host, port), await client_for(host, port)]
    tasks = [asyncio.create_task(held[0].send_message(*ENVELOPE, tiny_message("primary", 1)))]
    await wait_until(model.entered.is_set, what="the model holds a batch")
    tasks.append(asyncio.create_task(held[1].send_message(*ENVELOPE, tiny_message("primary", 2))))
    await wait_until(lambda: service.queue_depth >= 1, what="one message queued")
    return tasks


@pytest.mark.parametrize("policy", ["accept", "tempfail"])
async def test_overloaded_classifier_follows_the_failure_policy(
    start_triaged: StartTriaged, capture: CaptureServer, tmp_path: Path, policy: str
) -> None:
    path = write_model(tmp_path / "slow.onnx", heavy_layers=8)
    model = GatedEcho(str(path))

    def loader(p: str, choice: ProviderChoice, threads: int) -> BatchModel:
        return model

    # The thread runner: the test holds the model at a gate in this process.
    cs = ClassifierSettings(kind="onnx", model_path=str(path), provider="cpu", timeout_ms=30_000,
                            runner="thread", batcher=BatcherSettings(max_batch_size=1, queue_size=1))
    service = OnnxClassifierService(cs, loader=loader)
    srv = await start_triaged(classifier=service, policy={"on_classifier_error": policy})
    tasks = await fill_the_queue(srv, model)
    c = await client_for(*srv.addresses[0])
    # Answered at once, while the model is still held at its gate.
    code, text = await c.send_message(*ENVELOPE, tiny_message("primary", 3))
    assert not model.gate.is_set()
    if policy == "accept":
        assert code == 250
        assert len(capture.messages) == 1
        assert "x-triage-category" not in headers_of(capture.messages[0].data)  # unstamped
    else:
        assert (code, text) == (451, "4.3.2 Classifier busy, try again later")
        assert capture.messages == []  # not relayed: the sender retries
    model.gate.set()
    assert [(await t)[0] for t in tasks] == [250, 250]
    stamped = [m for m in capture.messages if "x-triage-category" in headers_of(m.data)]
    assert len(stamped) == 2  # the two that got into the batcher were classified
    await c.close()


# -- SIGHUP on a real `triaged serve` ------------------------------------------


async def wait_for_log(proc: TriagedProcess, needle: str, count: int = 1) -> None:
    try:
        await wait_until(lambda: proc.log_tail(1 << 20).count(needle) >= count, 30, interval=0.05)
    except AssertionError:
        raise AssertionError(f"{needle!r} not logged; log:\n{proc.log_tail()}") from None


@pytest.mark.asyncio(loop_factories=["uvloop"])  # a `triaged serve` child: uvloop whatever this loop is
async def test_sighup_swaps_the_model_of_a_running_server(
    capture: CaptureServer, tiny: Path, tmp_path: Path
) -> None:
    model = tmp_path / "current.onnx"
    shutil.copyfile(tiny, model)
    proc = TriagedProcess(capture.url, workdir=tmp_path)
    proc.config_path.write_text(serve_toml(proc.port, capture.url, tmp_path, model))
    await asyncio.to_thread(proc.start)
    try:
        replies: list[int] = []
        stop = asyncio.Event()

        async def flow() -> None:  # mail keeps flowing through the swap
            c = await client_for("127.0.0.1", proc.port)
            n = 0
            while not stop.is_set():
                replies.append((await c.send_message(*ENVELOPE, tiny_message("primary", n)))[0])
                n += 1
            await c.close()

        flowing = asyncio.create_task(flow())
        await wait_until(lambda: len(capture.messages) >= 5, 30)
        # Replace the file as an operator would (rename over it), then HUP.
        with_version(tiny, tmp_path / "new.onnx", "2")
        os.replace(tmp_path / "new.onnx", model)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for_log(proc, '"classifier_reloaded"')
        mark = len(capture.messages)
        await wait_until(lambda: len(capture.messages) >= mark + 5, 30)
        # A broken file: the reload fails, the running model stays.
        model.write_bytes(b"not a model")
        proc.proc.send_signal(signal.SIGHUP)
        await wait_for_log(proc, '"classifier_reload_failed"')
        mark2 = len(capture.messages)
        await wait_until(lambda: len(capture.messages) >= mark2 + 5, 30)
        stop.set()
        await flowing
    finally:
        await asyncio.to_thread(proc.stop)
    models = [headers_of(m.data)["x-triage-model"] for m in capture.messages]
    assert set(replies) == {250} and len(replies) == len(models)
    assert "tiny/2" not in models[:5]
    # One switch, never back: the message in flight when the reload landed may
    # still carry the old model (it was featurized before the swap), every
    # later one carries the new one, also after the failed second reload.
    switch = models.index("tiny/2")
    assert set(models[:switch]) == {"tiny/1"} and set(models[switch:]) == {"tiny/2"}
    assert switch <= mark + 1 and len(models) >= mark2 + 5
    assert proc.proc is None


def test_settings_default_to_the_onnx_classifier() -> None:
    # The proxy uses the model by default (issue 3), with rule overrides on.
    s = Settings()
    assert s.classifier.kind == "onnx" and s.classifier.rule_overrides


# -- the inference process crashing under a real SMTP transaction --------------


def _crash_service(tiny: Path, stats: BatchStats | None = None) -> OnnxClassifierService:
    cs = ClassifierSettings(kind="onnx", model_path=str(tiny), provider="cpu", timeout_ms=30_000,
                            rule_overrides=False, runner="process")
    return OnnxClassifierService(cs, metrics=stats, loader="batching_models:load_crashing_model")


def _runner_pid(service: OnnxClassifierService) -> int:
    pid = getattr(service.runner, "pid", None)
    assert isinstance(pid, int)
    return pid


@pytest.mark.parametrize("policy", ["accept", "tempfail"])
async def test_a_crash_in_the_inference_process_falls_back_to_the_rules(
    start_triaged: StartTriaged, capture: CaptureServer, tiny: Path, policy: str
) -> None:
    # Whatever on_classifier_error says: the model gave no verdict, the
    # header rules did, and the message says which (issue 9, finding 8).
    stats = BatchStats()
    service = _crash_service(tiny, stats)
    srv = await start_triaged(classifier=service, policy={"on_classifier_error": policy})
    first = _runner_pid(service)
    c = await client_for(*srv.addresses[0])
    crash = CRASH_HEADER + b"\r\n" + tiny_message("primary", 1)
    assert (await c.send_message(*ENVELOPE, crash))[0] == 250
    assert len(capture.messages) == 1
    stamped = headers_of(capture.messages[0].data)
    assert stamped["x-triage-model"] == FALLBACK_MODEL
    assert stamped["x-triage-category"] == "primary"
    assert "x-triage-spam" not in stamped  # the rules have no spam opinion
    assert stats.fallbacks == {"error": 1}
    # The next message is classified by a fresh inference process.
    assert (await c.send_message(*ENVELOPE, tiny_message("updates", 2)))[0] == 250
    stamped = headers_of(capture.messages[-1].data)
    assert stamped["x-triage-model"] == "tiny/1"
    assert _runner_pid(service) != first
    await c.close()


async def test_an_inference_process_killed_between_batches_costs_no_message(
    start_triaged: StartTriaged, capture: CaptureServer, tiny: Path
) -> None:
    service = _crash_service(tiny)
    srv = await start_triaged(classifier=service, policy={"on_classifier_error": "tempfail"})
    first = _runner_pid(service)
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: process_exited(first), what="the killed inference process is gone")
    c = await client_for(*srv.addresses[0])
    assert (await c.send_message(*ENVELOPE, tiny_message("forums", 3)))[0] == 250
    assert headers_of(capture.messages[-1].data)["x-triage-model"] == "tiny/1"
    assert _runner_pid(service) != first
    await c.close()
