"""Shadow mode (classifier/shadow.py, classifier.shadow_model_path) and
`triaged promote`: a candidate classifies live mail beside the serving model,
on every runner, without ever touching what is stamped.

Real models throughout: two tiny models trained here through `triaged
train`, one of them with `primary` and `updates` swapped, so the shadow
disagrees on exactly those messages.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Sequence
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import msgspec
import numpy as np
import pytest
import structlog
from batching_models import tiny_message, train_tiny_model
from conftest import CaptureServer, SmtpTestClient, base_settings
from triaged_proc import TriagedProcess, serve_toml
from waiting import wait_until

from classifier.config import ClassifierSettings
from classifier.inference import load_and_warm, load_onnx_model
from classifier.model import load_model
from classifier.service import OnnxClassifierService
from classifier.serving.inference_host import InferenceHost
from classifier.shadow import ShadowedModel
from classifier.types import Classification, ShadowVerdict
from proxy.__main__ import main as triaged
from proxy.events import EventBuilder, decode_event
from proxy.server import Server
from proxy.transaction import TransactionRecord

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("primary", "updates", "forums")
MESSAGES = [tiny_message(kind, 600 + i, seed=3) for i, kind in enumerate(KINDS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("shadow")
    serving = train_tiny_model(work, work / "serving.onnx", name="serving")
    swapped = train_tiny_model(work, work / "swapped.onnx", name="swapped",
                               relabel={"primary": "updates", "updates": "primary"})
    return serving, swapped


def expected(serving: Path, shadow: Path) -> list[tuple[Classification, Classification]]:
    """(serving verdict, shadow verdict) of MESSAGES, each model run on its own."""
    ours, theirs = load_model(str(serving)), load_model(str(shadow))
    return list(zip(ours.predict(ours.featurize_many(MESSAGES)),
                    theirs.predict(theirs.featurize_many(MESSAGES)), strict=True))


def test_the_shadow_verdicts_ride_with_the_serving_ones(models: tuple[Path, Path]) -> None:
    serving, swapped = models
    model, _ = load_and_warm(str(serving), "cpu", 0, 1, load_onnx_model, str(swapped))
    assert isinstance(model, ShadowedModel) and model.name_version == "serving/1"
    got = model.predict(model.featurize_many(MESSAGES))
    for g, (ours, theirs) in zip(got, expected(serving, swapped), strict=True):
        # What is stamped is the serving model's, to the last digit.
        assert msgspec.structs.replace(g, shadow=None) == ours
        assert g.shadow == ShadowVerdict(model="swapped/1", category=theirs.category,
                                         spam=theirs.spam, same_category=theirs.category == ours.category,
                                         same_spam=theirs.spam == ours.spam)  # fmt: skip
    assert [g.category for g in got] == list(KINDS)
    assert [g.shadow.category for g in got if g.shadow] == ["updates", "primary", "forums"]
    assert [g.shadow.same_category for g in got if g.shadow] == [False, False, True]


def test_a_shadow_that_cannot_run_beside_is_left_out(models: tuple[Path, Path], tmp_path: Path) -> None:
    serving, _ = models
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    # The bundled model hashes into 65,536 buckets, the tiny ones into 4,096:
    # the same ids would mean other things to it.
    for shadow, why in ((broken, "cannot load model"), (ROOT / "models/default.onnx", "other features")):
        with structlog.testing.capture_logs() as logs:
            model, _ = load_and_warm(str(serving), "cpu", 0, 1, load_onnx_model, str(shadow))
        assert not isinstance(model, ShadowedModel) and model.name_version == "serving/1"
        assert model.predict(model.featurize_many(MESSAGES))[0].shadow is None
        (line,) = [e for e in logs if e["event"] == "classifier.shadow_unavailable"]
        assert why in line["error"] and line["shadow"] == str(shadow)


class _Failing:
    """A shadow whose model call fails (a runtime error in the candidate)."""

    def __init__(self, model: object) -> None:
        self.model = model

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        raise RuntimeError("candidate runtime failure")


def test_a_failing_shadow_costs_no_verdict(models: tuple[Path, Path]) -> None:
    serving, swapped = models
    ours = load_model(str(serving))
    model = ShadowedModel(ours, _Failing(load_model(str(swapped))), str(swapped))
    with structlog.testing.capture_logs() as logs:
        got = model.predict(model.featurize_many(MESSAGES))
        again = model.predict(model.featurize_many(MESSAGES))
    assert got == again == ours.predict(ours.featurize_many(MESSAGES))  # no shadow, no loss
    assert [e["event"] for e in logs] == ["classifier.shadow_failed"]  # once per spell


def headers_of(data: bytes) -> dict[str, str]:
    msg = BytesParser(policy=compat32).parsebytes(data, headersonly=True)
    return {k.lower(): str(v) for k, v in msg.items()}


class _Records:
    def __init__(self) -> None:
        self.records: list[TransactionRecord] = []

    def record(self, record: TransactionRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("runner", ["process", "thread"])
async def test_a_server_in_shadow_mode_stamps_the_serving_model_and_reports_the_shadow(
    capture: CaptureServer, models: tuple[Path, Path], runner: str
) -> None:
    serving, swapped = models
    settings = base_settings(capture.url)
    cs = ClassifierSettings(kind="onnx", model_path=str(serving), provider="cpu",
                            rule_overrides=False, timeout_ms=30_000.0, runner=runner,  # type: ignore[arg-type]
                            shadow_model_path=str(swapped))  # fmt: skip
    srv = Server(msgspec.structs.replace(settings, classifier=cs))
    await srv.start()
    records = _Records()
    srv.pipeline.sinks.append(records)
    try:
        c = await SmtpTestClient.connect(*srv.addresses[0])
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO client.test"))[0] == 250
        for raw in MESSAGES:
            assert (await c.send_message("a@example.org", ["b@example.net"], raw))[0] == 250
        await c.close()
    finally:
        await srv.stop(drain_timeout_s=1.0)
    pairs = expected(serving, swapped)
    for got, (ours, _) in zip(capture.messages, pairs, strict=True):
        h = headers_of(got.data)
        assert h["x-triage-model"] == "serving/1"
        assert h["x-triage-category"] == ours.category
        assert not any("swapped" in v or "shadow" in k for k, v in h.items())
    # Events: the shadow's verdict beside the serving one.
    builder = EventBuilder("test", "")
    events = [decode_event(json.dumps(msgspec.to_builtins(builder.build(r))).encode())
              for r in records.records]
    assert [(e.category, e.shadow_model, e.shadow_category) for e in events] == [
        (ours.category, "swapped/1", theirs.category) for ours, theirs in pairs]
    # Metrics: how often it would have decided otherwise.
    reg = srv.metrics.registry
    assert reg.get_sample_value("triaged_shadow_verdicts_total", {"head": "category", "agreed": "no"}) == 2
    assert reg.get_sample_value("triaged_shadow_verdicts_total", {"head": "category", "agreed": "yes"}) == 1
    spam = [reg.get_sample_value("triaged_shadow_verdicts_total", {"head": "spam", "agreed": a}) or 0
            for a in ("yes", "no")]
    assert sum(spam) == 3


async def test_the_inference_service_runs_the_shadow_for_its_workers(
    models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    serving, swapped = models
    sock = Path("/tmp") / f"shadow-{tmp_path_factory.getbasetemp().name[-12:]}.sock"
    endpoint = f"unix:{sock}"
    host_settings = ClassifierSettings(model_path=str(serving), provider="cpu", runner="service",
                                       endpoint=endpoint, rule_overrides=False,
                                       shadow_model_path=str(swapped))  # fmt: skip
    host = InferenceHost(host_settings, endpoint)
    await host.start()
    client = OnnxClassifierService(ClassifierSettings(
        model_path="unused.onnx", runner="service", endpoint=endpoint, rule_overrides=False,
        timeout_ms=30_000.0))  # fmt: skip
    await client.start()
    try:
        got = [await client.classify(raw) for raw in MESSAGES]
    finally:
        await client.close()
        await host.close()
        sock.unlink(missing_ok=True)
    pairs = expected(serving, swapped)
    assert [(g.model, g.category) for g in got] == [(o.model, o.category) for o, _ in pairs]
    assert [g.shadow.category if g.shadow else None for g in got] == [t.category for _, t in pairs]


async def _send(port: int, raw: bytes) -> None:
    c = await SmtpTestClient.connect("127.0.0.1", port)
    assert (await c.reply())[0] == 220
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.send_message("a@example.org", ["b@example.net"], raw))[0] == 250
    await c.close()


@pytest.mark.asyncio(loop_factories=["uvloop"])  # a `triaged serve` child: uvloop whatever this loop is
async def test_sighup_turns_shadow_mode_on_and_off_in_a_running_server(
    capture: CaptureServer, models: tuple[Path, Path], tmp_path: Path
) -> None:
    serving, swapped = models
    proc = TriagedProcess(capture.url, workdir=tmp_path)
    plain = serve_toml(proc.port, capture.url, tmp_path, serving)
    proc.config_path.write_text(plain)
    events = tmp_path / "events.jsonl"

    def shipped() -> list[dict[str, object]]:
        if not events.exists():
            return []
        return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]

    async def reload(config: str, count: int) -> None:
        proc.config_path.write_text(config)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: proc.log_tail(1 << 20).count('"config_reloaded"') >= count, 30)

    await asyncio.to_thread(proc.start)
    try:
        await _send(proc.port, MESSAGES[0])
        await reload(plain.replace('provider = "cpu"', f'provider = "cpu"\nshadow_model_path = "{swapped}"'), 1)
        await _send(proc.port, MESSAGES[0])
        await reload(plain, 2)
        await _send(proc.port, MESSAGES[0])
        await wait_until(lambda: len(shipped()) >= 3, 30)
    finally:
        await asyncio.to_thread(proc.stop)
    # One message before, one during and one after shadow mode; stamped alike.
    assert [e.get("shadow_category") for e in shipped()] == [None, "updates", None]
    assert {e["category"] for e in shipped()} == {"primary"}
    assert {headers_of(m.data)["x-triage-model"] for m in capture.messages} == {"serving/1"}


# -- triaged promote -------------------------------------------------------------------


def _report(path: Path, candidate: Path, accepted: bool) -> None:
    path.write_text(json.dumps({"accepted": accepted, "reasons": [] if accepted else ["worse on the canary"],
                                "candidate_file": str(candidate)}))  # fmt: skip


def test_promote_takes_only_a_candidate_the_gate_accepted(models: tuple[Path, Path], tmp_path: Path) -> None:
    serving, swapped = models
    model = tmp_path / "model.onnx"
    model.write_bytes(serving.read_bytes())
    candidate = tmp_path / "model.onnx.candidate"
    candidate.write_bytes(swapped.read_bytes())
    report = tmp_path / "model.onnx.learn.json"
    args = ["promote", "--model", str(model)]

    assert triaged(args) == 2  # no learn report: no gate decision
    _report(report, candidate, accepted=False)
    assert triaged(args) == 2
    _report(report, tmp_path / "other.candidate", accepted=True)
    assert triaged(args) == 2  # a report about another file vouches for nothing
    assert model.read_bytes() == serving.read_bytes()

    _report(report, candidate, accepted=True)
    assert triaged(args) == 0
    assert model.read_bytes() == swapped.read_bytes()
    assert (tmp_path / "model.onnx.prev").read_bytes() == serving.read_bytes()
    assert triaged(["rollback", "--model", str(model)]) == 0
    assert model.read_bytes() == serving.read_bytes()


def test_promote_force_and_a_candidate_that_does_not_load(models: tuple[Path, Path], tmp_path: Path) -> None:
    serving, swapped = models
    model = tmp_path / "model.onnx"
    model.write_bytes(serving.read_bytes())
    broken = tmp_path / "broken.candidate"
    broken.write_bytes(b"half a file")
    assert triaged(["promote", "--model", str(model), "--candidate", str(broken), "--force"]) == 2
    assert model.read_bytes() == serving.read_bytes()
    assert triaged(["promote", "--model", str(model), "--candidate", str(swapped), "--force"]) == 0
    assert model.read_bytes() == swapped.read_bytes()


def test_classify_with_a_shadow_compares_two_models_on_a_folder(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serving, swapped = models
    folder = tmp_path / "mail"
    folder.mkdir()
    for i, raw in enumerate(MESSAGES):
        (folder / f"{i}.eml").write_bytes(raw)
    assert triaged(["classify", str(serving), str(folder), "--json", "--shadow", str(swapped)]) == 0
    out, err = capsys.readouterr()
    rows = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["message"])
    assert [(r["category"], r["shadow_category"]) for r in rows] == [
        ("primary", "updates"), ("updates", "primary"), ("forums", "forums")]
    assert {r["model"] for r in rows} == {"serving/1"} and {r["shadow_model"] for r in rows} == {"swapped/1"}
    assert "3 messages" in err and "files 2 elsewhere (66.7%)" in err
    # A candidate hashed with other features cannot be compared id for id.
    assert triaged(["classify", str(serving), str(folder), "--shadow", str(ROOT / "models/default.onnx")]) == 2
    assert "other features" in capsys.readouterr().err
