"""When the model gives no verdict, mail is stamped by the header rules
(issue 9, findings 8 and 9).

- The deadline (classifier.timeout_ms) has one owner, the batcher: a slow
  model moves triaged_classifier_timeouts once per miss, and the message
  gets the rules' verdict, stamped X-Triage-Model: rules-fallback/1.
- An inference process killed over and over, while it runs and while it
  starts, costs no message its stamp: each is stamped by the model or the
  fallback, and every message accepted is delivered once, unaltered below
  our headers.
- The log says when the classifier starts and stops degrading, not per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Sequence
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest
import structlog
from batching_models import load_echo, tiny_message, train_tiny_model, write_model
from conftest import CaptureServer, SmtpTestClient, base_settings
from onnx_server import onnx_settings, served

import classifier.service as service_mod
from classifier.batch_metrics import BatchStats
from classifier.config import ClassifierSettings
from classifier.inference import BatchModel, load_onnx_model
from classifier.model import LoadedModel
from classifier.providers import ProviderChoice
from classifier.service import FALLBACK_MODEL, OnnxClassifierService
from classifier.types import Classification
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline

ENVELOPE = ("sender@example.org", ["rcpt@example.net"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tiny-degrade")
    return train_tiny_model(work, work / "tiny.onnx", name="tiny", version="1")


def headers_of(data: bytes) -> dict[str, str]:
    msg = BytesParser(policy=compat32).parsebytes(data, headersonly=True)
    return {k.lower(): str(v) for k, v in msg.items()}


async def client_for(host: str, port: int) -> SmtpTestClient:
    c = await SmtpTestClient.connect(host, port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    return c


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- finding 9: one owner for the deadline ------------------------------------------


class _Held:
    """A thread-runner loader whose model, once armed, answers only when
    `release` is set (the load-time warm-up runs unarmed)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.armed = False

    def __call__(self, path: str, choice: ProviderChoice, threads: int) -> BatchModel:
        model = load_onnx_model(path, choice, threads)
        assert isinstance(model, LoadedModel)
        held = self

        class Slow(LoadedModel):
            def predict(self, batch: Sequence[Any]) -> list[Classification]:
                if held.armed:
                    held.release.wait(30)
                return super().predict(batch)

        return Slow(model.session, model.manifest, model.path)


async def test_a_slow_model_counts_one_timeout_and_the_rules_stamp_the_message(
    capture: CaptureServer, tiny: Path
) -> None:
    metrics = Metrics()  # the prometheus adapter the server would give it
    held = _Held()
    settings = onnx_settings(capture, tiny, runner="thread", timeout_ms=300.0)
    service = OnnxClassifierService(settings.classifier, metrics=metrics.batcher, loader=held)
    async with served(settings, service) as srv:
        held.armed = True
        try:
            c = await client_for(*srv.addresses[0])
            message = tiny_message("updates", 1).replace(
                b"From: ", b"List-Post: <mailto:l@x>\r\nFrom: ")
            code, _ = await c.send_message(*ENVELOPE, message)
            await c.close()
        finally:
            held.release.set()
    assert code == 250
    stamped = headers_of(capture.messages[0].data)
    assert stamped["x-triage-model"] == FALLBACK_MODEL
    assert stamped["x-triage-category"] == "forums"  # the rules read List-Post
    # The batcher owns the deadline and counted the miss, once; the pipeline's
    # safety net did not fire (it would count a classifier error).
    assert sample(metrics, "triaged_classifier_timeouts_total") == 1
    assert sample(metrics, "triaged_classifier_fallbacks_total", reason="timeout") == 1
    assert srv.pipeline.classifier_errors == 0


class _Deaf:
    """A Classifier that ignores every deadline (a bug the safety net is for)."""

    def __init__(self) -> None:
        self.calls = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def classify(self, raw: bytes) -> Classification:
        self.calls += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_a_classifier_that_ignores_its_deadline_meets_the_safety_net() -> None:
    settings = base_settings("smtp://127.0.0.1:9", classifier={"timeout_ms": 100.0})
    deaf = _Deaf()
    pipeline = Pipeline(settings, deaf)
    assert pipeline._safety_net_s == pytest.approx(1.1)  # timeout + 1 s (at least 2x)
    verdict = await pipeline.decide(tiny_message("primary", 1))
    assert verdict.classification is None and verdict.action == "accept"  # the policy
    assert pipeline.classifier_errors == 1 and deaf.calls == 1


# -- finding 8: the inference process killed in a loop -----------------------------


def inference_children() -> list[int]:
    """PIDs of this process's inference processes, started or still starting."""
    me = str(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and b"classifier.worker_process" in cmdline:
            pids.append(int(entry.name))
    return pids


# 15 s of kills and restarts; what it tests (the process runner, the rules
# fallback) does not depend on the loop: once, on uvloop, as production runs.
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_killing_the_inference_process_in_a_loop_leaves_no_message_unstamped(
    capture: CaptureServer, tiny: Path
) -> None:
    async with served(onnx_settings(capture, tiny, timeout_ms=1000.0)) as srv:
        done = asyncio.Event()
        kills = 0

        async def killer() -> None:
            # Four kills span a restart back-off (5 s) and the restart after it.
            nonlocal kills
            while kills < 4:
                for pid in inference_children():  # running or still loading
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                await asyncio.sleep(0.03)
            done.set()

        sent: dict[str, bytes] = {}
        codes: list[int] = []

        async def sender(worker: int) -> None:
            c = await client_for(*srv.addresses[0])
            try:
                n = 0
                while not done.is_set():
                    kind = ("primary", "updates", "forums")[n % 3]
                    raw = tiny_message(kind, n, seed=worker)
                    sent[headers_of(raw)["message-id"]] = raw
                    codes.append((await c.send_message(*ENVELOPE, raw))[0])
                    n += 1
            finally:
                await c.close()

        kill_task = asyncio.create_task(killer())
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(sender(w) for w in range(8)))
        finally:
            kill_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await kill_task
        # Every message was accepted, and each is at the next hop once,
        # stamped (by the model or the rules), unaltered below our headers.
        assert len(codes) == len(sent) > 100
        assert codes == [250] * len(sent)
        assert len(capture.messages) == len(sent)
        seen: set[str] = set()
        models: set[str] = set()
        for got in capture.messages:
            stamped = headers_of(got.data)
            mid = stamped["message-id"]
            assert mid not in seen
            seen.add(mid)
            assert got.data.endswith(sent[mid])
            assert stamped.get("x-triage-model") in ("tiny/1", FALLBACK_MODEL), stamped
            models.add(stamped["x-triage-model"])
        assert FALLBACK_MODEL in models  # it really was down
        fallbacks = sum(sample(srv.metrics, "triaged_classifier_fallbacks_total", reason=r)
                        for r in ("timeout", "error"))
        assert fallbacks == sum(
            headers_of(m.data)["x-triage-model"] == FALLBACK_MODEL for m in capture.messages
        )
        # Left alone, the model comes back (after the restart back-off).
        c = await client_for(*srv.addresses[0])
        try:
            for n in range(200):
                assert (await c.send_message(*ENVELOPE, tiny_message("forums", n, 99)))[0] == 250
                if headers_of(capture.messages[-1].data)["x-triage-model"] == "tiny/1":
                    break
                await asyncio.sleep(0.1)
        finally:
            await c.close()
        assert headers_of(capture.messages[-1].data)["x-triage-model"] == "tiny/1"


# -- the log: one line per change of state -----------------------------------------


async def test_degrading_and_recovering_are_logged_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_mod, "RECOVERED_AFTER_S", 0.2)
    stats = BatchStats()
    settings = ClassifierSettings(model_path=str(write_model(tmp_path / "echo.onnx")),
                                  provider="cpu", runner="thread", timeout_ms=30_000)
    service = OnnxClassifierService(settings, metrics=stats, loader=load_echo)
    await service.start()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):  # five messages the model cannot featurize
                assert (await service.classify(b"unparseable")).model == FALLBACK_MODEL
            assert service.degraded
            assert (await service.classify(b"7")).category == "7"
            assert service.degraded  # too soon after the last fallback to call it over
            await asyncio.sleep(0.3)
            assert (await service.classify(b"8")).category == "8"
            assert not service.degraded
    finally:
        await service.close()
    events = [e["event"] for e in logs if e["event"].startswith("classifier.")]
    assert events == ["classifier.degraded", "classifier.recovered"]
    recovered = next(e for e in logs if e["event"] == "classifier.recovered")
    assert recovered["fallbacks"] == 5
    assert stats.fallbacks == {"error": 5}
