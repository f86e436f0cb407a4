"""The shared inference service (classifier/serving/): a real service process
(InferenceHost, `triaged inference`), real client processes and connections,
real ONNX models (the bundled default model; echo models from
tests/service_models.py where a test needs to tell results apart)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from batching_models import provider_setting, write_model
from conftest import CaptureServer
from service_client import messages
from service_models import HANG, POISON
from waiting import wait_until

from classifier.batch_metrics import BatchStats
from classifier.config import BatcherSettings, ClassifierSettings, ServiceSettings
from classifier.service import FALLBACK_MODEL, OnnxClassifierService
from classifier.serving import control
from classifier.serving import service_wire as wire
from classifier.serving.endpoints import parse_endpoint
from classifier.serving.inference_host import InferenceHost
from classifier.serving.inference_server import InferenceServer
from classifier.serving.remote_runner import RemoteRunner
from classifier.types import Classification, ClassifierError, Overloaded

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "default.onnx"
ECHO = "service_models:load_served_echo"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short: a Unix socket path has 107 bytes at most, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="infsvc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings_for(model: Path, endpoint: str = "", *, runner: str = "service",
                 timeout_ms: float = 30_000, **batcher: float) -> ClassifierSettings:
    # TRIAGED_TEST_PROVIDER=cuda (bench/gpu_check.sh) runs the service on the GPU.
    return ClassifierSettings(
        model_path=str(model), provider=provider_setting(), runner=runner,  # type: ignore[arg-type]
        endpoint=endpoint, timeout_ms=timeout_ms,
        batcher=BatcherSettings(**batcher),  # type: ignore[arg-type]
    )


@pytest_asyncio.fixture
async def echo_host(sockdir: Path) -> AsyncIterator[InferenceHost]:
    """A service on a slow echo model (a batch takes measurable time)."""
    model = write_model(sockdir / "echo-a.onnx", heavy_layers=8)
    endpoint = f"unix:{sockdir}/inference.sock"
    host = InferenceHost(settings_for(model, endpoint, max_wait_ms=5), endpoint, loader=ECHO)
    await host.start()
    try:
        yield host
    finally:
        await host.close()


async def clients(endpoint: str, n: int, stats: BatchStats | None = None,
                  **batcher: float) -> list[OnnxClassifierService]:
    out = []
    for _ in range(n):
        service = OnnxClassifierService(
            settings_for(Path("unused.onnx"), endpoint, **batcher), metrics=stats)
        await service.start()
        out.append(service)
    return out


async def close_all(services: list[OnnxClassifierService]) -> None:
    await asyncio.gather(*(s.close() for s in services))


# -- batching across client processes, results equal to in-process -------------------


async def test_batches_mix_client_processes_and_each_gets_its_own_verdict(sockdir: Path) -> None:
    endpoint = f"unix:{sockdir}/inference.sock"
    host = InferenceHost(settings_for(DEFAULT_MODEL, endpoint, max_wait_ms=20), endpoint)
    await host.start()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "tests" / "service_client.py"), endpoint,
            str(DEFAULT_MODEL), "120", str(seed), env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for seed in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outputs = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
        stats = await host.stats()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await host.close()
    assert all(p.returncode == 0 for p in procs)
    # Each client's own verdicts, equal to the in-process thread runner's
    # for the same messages (features here, model there, overrides here).
    local = OnnxClassifierService(settings_for(DEFAULT_MODEL, runner="thread"))
    await local.start()
    try:
        for seed, (out, _) in enumerate(outputs):
            remote = json.loads(out.decode().strip().splitlines()[-1])
            expected = [await local.classify(m) for m in messages(120, seed)]
            assert remote == [[r.category, r.score, r.spam_score, r.model] for r in expected]
    finally:
        await local.close()
    workers = {label: n for label, n in stats.per_connection.items() if label.startswith("worker")}
    assert len(workers) == 3 and all(n == 120 for n in workers.values()), stats.per_connection
    assert stats.requests == 360
    if provider_setting() != "auto":  # cuda on the GPU check: the service really ran there
        assert stats.provider == provider_setting()
    # The point of the service: one model call for messages of several workers.
    assert stats.multi_client_batches > 0, stats
    assert max(stats.batch_sizes) > 8, stats.batch_sizes  # more than one client batch


async def test_overloaded_is_answered_at_once(sockdir: Path) -> None:
    model = write_model(sockdir / "echo-a.onnx", heavy_layers=16)
    endpoint = f"unix:{sockdir}/inference.sock"
    host = InferenceHost(settings_for(model, endpoint, max_batch_size=4, queue_size=4),
                         endpoint, loader=ECHO)
    await host.start()
    services = await clients(endpoint, 3, max_batch_size=64)
    try:
        results = await asyncio.gather(
            *(services[i % 3].classify(b"%d" % i) for i in range(300)), return_exceptions=True)
        stats = await host.stats()
    finally:
        await close_all(services)
        await host.close()
    refused = [r for r in results if isinstance(r, Overloaded)]
    served = [(i, r) for i, r in enumerate(results) if isinstance(r, Classification)]
    assert refused and served
    assert len(refused) + len(served) == 300
    assert all(r.category == str(i) and r.model == "echo-a" for i, r in served)
    assert stats.overloaded == len(refused)


# -- failures ---------------------------------------------------------------------------


async def test_a_killed_service_is_restarted_and_in_flight_messages_fall_back(
    echo_host: InferenceHost,
) -> None:
    stats = BatchStats()
    services = await clients(echo_host.endpoint, 3, stats, max_batch_size=16)
    try:
        first = echo_host.pid
        assert first is not None
        load = [asyncio.create_task(services[i % 3].classify(b"%d" % i)) for i in range(600)]
        await wait_until(lambda: stats.items >= 60, 60, what="load flows through the service")
        os.kill(first, signal.SIGKILL)
        # No hang, no exception: each message has the model's verdict or the rules'.
        results = await asyncio.wait_for(asyncio.gather(*load), 120)
        await wait_until(lambda: echo_host.pid not in (None, first), 60,
                         what="the service is restarted")
        assert await echo_host.ping()

        async def served_by_model() -> bool:
            return (await services[0].classify(b"7")).model == "echo-a"

        for _ in range(200):
            if all(await asyncio.gather(*(served_by_model() for _ in range(3)))):
                break
            await asyncio.sleep(0.05)
        after = await asyncio.gather(*(s.classify(b"%d" % i) for i, s in enumerate(services)))
    finally:
        await close_all(services)
    assert all(isinstance(r, Classification) for r in results)
    fallbacks = [r for r in results if r.model == FALLBACK_MODEL]
    model = [(i, r) for i, r in enumerate(results) if r.model == "echo-a"]
    assert fallbacks, "the kill hit no batch in flight"
    assert len(fallbacks) + len(model) == 600
    assert all(r.category == str(i) for i, r in model)
    assert stats.fallbacks.get("error", 0) == len(fallbacks)
    assert [(r.model, r.category) for r in after] == [("echo-a", str(i)) for i in range(3)]
    assert echo_host.restarts == 1


async def test_a_model_call_that_raises_fails_only_its_message(echo_host: InferenceHost) -> None:
    services = await clients(echo_host.endpoint, 1, max_batch_size=16, max_wait_ms=50)
    try:
        numbers = [1, 2, POISON, 4, 5]
        results = await asyncio.gather(*(services[0].classify(b"%d" % n) for n in numbers))
        stats = await echo_host.stats()
    finally:
        await close_all(services)
    assert [r.model for r in results] == ["echo-a"] * 2 + [FALLBACK_MODEL] + ["echo-a"] * 2
    assert [r.category for i, r in enumerate(results) if i != 2] == ["1", "2", "4", "5"]
    assert stats.errors == 1 and stats.isolated_batches >= 1


async def test_a_hung_model_call_ends_the_service_which_is_restarted(sockdir: Path) -> None:
    model = write_model(sockdir / "echo-a.onnx")
    endpoint = f"unix:{sockdir}/inference.sock"
    # timeout_ms 1 s: the caller falls back after 1 s; the service gives the
    # model call HANG_MIN_S (10 s) before it calls it hung and exits.
    host = InferenceHost(settings_for(model, endpoint, timeout_ms=1000), endpoint, loader=ECHO)
    await host.start()
    stats = BatchStats()
    (service,) = await clients(endpoint, 1, stats, timeout_ms=1000)
    try:
        first = host.pid
        verdict = await service.classify(b"%d" % HANG)
        assert verdict.model == FALLBACK_MODEL
        assert stats.fallbacks == {"timeout": 1}
        await wait_until(lambda: host.pid not in (None, first), 60,
                         what="the hung service exits and is restarted")

        async def model_answers() -> bool:
            return (await service.classify(b"5")).model == "echo-a"

        for _ in range(400):
            if await model_answers():
                break
            await asyncio.sleep(0.05)
        assert (await service.classify(b"6")).category == "6"
        assert host.restarts == 1
    finally:
        await service.close()
        await host.close()


@pytest.mark.parametrize("runner", ["thread", "process"])
async def test_ping_answers_for_every_runner(sockdir: Path, runner: str) -> None:
    model = write_model(sockdir / "echo-a.onnx")
    s = ClassifierSettings(model_path=str(model), provider=provider_setting(),  # type: ignore[arg-type]
                           runner=runner)  # type: ignore[arg-type]
    service = OnnxClassifierService(s, loader="batching_models:load_echo")
    assert not await service.ping()
    await service.start()
    try:
        assert await service.ping()
        assert (await service.classify(b"3")).category == "3"
    finally:
        await service.close()
    assert not await service.ping()


async def test_unreachable_service_at_start_falls_back_then_reconnects(sockdir: Path) -> None:
    model = write_model(sockdir / "echo-a.onnx")
    endpoint = f"unix:{sockdir}/inference.sock"
    stats = BatchStats()
    (service,) = await clients(endpoint, 1, stats)
    host = InferenceHost(settings_for(model, endpoint), endpoint, loader=ECHO)
    try:
        assert not await service.ping()
        assert service.model_name is None  # for /readyz: no model reached yet
        verdict = await service.classify(b"Subject: hi\r\nList-Post: <x>\r\n\r\nhello\r\n")
        assert verdict.model == FALLBACK_MODEL and verdict.category == "forums"
        assert stats.fallbacks == {"error": 1}
        await host.start()  # the service comes up later: the worker reconnects

        async def model_answers() -> bool:
            return (await service.classify(b"42")).model == "echo-a"

        for _ in range(200):
            if await model_answers():
                break
            await asyncio.sleep(0.05)
        assert (await service.classify(b"43")).category == "43"
        assert await service.ping()
        assert service.model_name == "echo-a"
    finally:
        await service.close()
        await host.close()


async def test_a_missing_endpoint_is_a_clear_error(sockdir: Path) -> None:
    service = OnnxClassifierService(settings_for(sockdir / "m.onnx", ""))
    with pytest.raises(ClassifierError, match=r"classifier\.endpoint"):
        await service.start()


def test_config_checks_the_endpoints() -> None:
    from proxy.settings import ConfigError, decode_settings

    with pytest.raises(ConfigError, match=r"classifier\.endpoint"):
        decode_settings('[classifier]\nendpoint = "nonsense"\n')
    with pytest.raises(ConfigError, match=r"classifier\.service\.allowed_clients\[0\]"):
        decode_settings('[classifier.service]\nallowed_clients = ["not-a-net"]\n')
    with pytest.raises(ConfigError, match=r"classifier\.service\.listen"):
        decode_settings('[classifier.service]\nlisten = "unix:relative"\n')
    s = decode_settings('[classifier]\nrunner = "service"\nendpoint = "gpu1.example:7311"\n')
    assert parse_endpoint(s.classifier.endpoint).port == 7311


# -- hot swap -----------------------------------------------------------------------


async def _load_until(services: list[OnnxClassifierService], answers: list[tuple[int, str, str]],
                      stop: asyncio.Event) -> None:
    async def client(w: int) -> None:
        n = 0
        while not stop.is_set():
            i = w * 100_000 + n  # float32 echoes integers below 2**24 exactly
            n += 1
            r = await services[w % len(services)].classify(b"%d" % i)
            answers.append((i, r.category, r.model))

    await asyncio.gather(*(client(w) for w in range(24)))


@pytest.mark.parametrize("new_offset", [0.0, 1000.0], ids=["same-features", "new-features"])
async def test_hot_swap_under_load_loses_nothing(echo_host: InferenceHost, sockdir: Path,
                                                 new_offset: float) -> None:
    # offset 1000: the new model reads other features (service_models: the
    # spec's shift), so a request featurized for the old one must not reach it.
    new = write_model(sockdir / "echo-new.onnx", heavy_layers=8, offset=new_offset)
    stats = BatchStats()
    services = await clients(echo_host.endpoint, 3, stats)
    answers: list[tuple[int, str, str]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load_until(services, answers, stop))
    try:
        await wait_until(lambda: len(answers) >= 200, 60, what="load flows")
        assert await echo_host.reload(str(new)) == "echo-new"
        swapped_at = len(answers)
        await wait_until(lambda: len(answers) >= swapped_at + 300, 60, what="load after swap")
        after = await asyncio.gather(*(s.classify(b"5") for s in services))
        stop.set()
        await asyncio.wait_for(load, 60)
        service_stats = await echo_host.stats()
        # A worker's reload() asks the service, it does not load the model again.
        assert await services[0].reload() == "echo-new"
        assert (await echo_host.stats()).reloads == 1
    finally:
        stop.set()
        await close_all(services)
    assert all(category == str(i) for i, category, _ in answers), "a verdict went astray"
    assert {model for *_, model in answers} == {"echo-a", "echo-new"}
    assert [(r.model, r.category) for r in after] == [("echo-new", "5")] * 3
    assert stats.fallbacks == {} and stats.errors == 0
    assert service_stats.reloads == 1 and service_stats.name_version == "echo-new"
    if not new_offset:
        assert service_stats.stale == 0


async def test_features_for_a_replaced_spec_are_answered_stale_and_redone(
    echo_host: InferenceHost, sockdir: Path,
) -> None:
    runner = await RemoteRunner.open(settings_for(Path("unused"), echo_host.endpoint))
    try:
        old_info = runner._info
        assert old_info is not None
        assert await echo_host.reload(str(write_model(sockdir / "echo-b.onnx", offset=1000.0)))
        # A batch featurized for the old spec reaches the new model (the race
        # a hot swap opens): the service must answer stale, not run it.
        conn = runner._conn
        assert conn is not None
        # The pushed Info, read and dropped.
        await wait_until(lambda: bool(conn.poll()), 10, interval=0.005)
        answer = await _raw_classify(conn, old_info, [b"3", b"4"])
        assert [wire.failure_kind(v) for v in answer.verdicts] == ["stale", "stale"]
        # The runner in the same spot (its Info not yet updated) redoes them once.
        runner._info = old_info
        verdicts, _ = await runner.classify_batch([b"8", b"9"])
    finally:
        await runner.close()
    assert [(v.category, v.model) for v in verdicts if isinstance(v, Classification)] == [
        ("8", "echo-b"), ("9", "echo-b")]
    assert (await echo_host.stats()).stale >= 4


async def _raw_classify(conn: wire.ClientConnection, info: wire.Info, raws: list[bytes]) -> wire.Results:
    from classifier.inference import featurize
    from classifier.serving.feature_spec import featurizer_for

    batch = featurize(featurizer_for(info.spec), raws)
    conn.write(wire.encode(wire.Classify(99, info.spec.id, 30_000, wire.arrays_of(batch.features))))
    while True:
        frame = await conn.receive()
        if isinstance(frame, wire.Results) and frame.id == 99:
            return frame


async def test_a_failed_reload_keeps_the_old_model(echo_host: InferenceHost, sockdir: Path) -> None:
    broken = sockdir / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    (service,) = await clients(echo_host.endpoint, 1)
    try:
        with pytest.raises(ClassifierError, match="cannot load model"):
            await echo_host.reload(str(broken))
        verdict = await service.classify(b"12")
        stats = await echo_host.stats()
    finally:
        await service.close()
    assert (verdict.model, verdict.category) == ("echo-a", "12")
    assert stats.failed_reloads == 1 and stats.name_version == "echo-a"


async def test_sighup_reloads_the_service(echo_host: InferenceHost) -> None:
    pid = echo_host.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)
    await wait_until_async(lambda: echo_host.stats(), lambda s: s.reloads == 1)
    assert echo_host.pid == pid and await echo_host.ping()


async def wait_until_async(get, check, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await get()
        if check(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, f"not reached: {value}"
        await asyncio.sleep(0.05)


# -- TCP: the micro-service split ------------------------------------------------------


async def test_tcp_clients_outside_the_allowlist_are_refused(sockdir: Path) -> None:
    model = write_model(sockdir / "echo-a.onnx")

    def server(cidrs: list[str]) -> InferenceServer:
        s = settings_for(model)
        s = ClassifierSettings(**{**{f: getattr(s, f) for f in s.__struct_fields__},
                                  "service": ServiceSettings(allowed_clients=cidrs)})
        return InferenceServer(s, parse_endpoint("127.0.0.1:0"), loader=ECHO)

    refusing = server(["10.0.0.0/8"])
    await refusing.start()
    try:
        endpoint = f"127.0.0.1:{refusing.port}"
        assert await control.ping(parse_endpoint(endpoint), 5.0) is None
        (service,) = await clients(endpoint, 1)
        try:
            assert (await service.classify(b"1")).model == FALLBACK_MODEL
        finally:
            await service.close()
        assert refusing.stats().refused_clients >= 2
    finally:
        await refusing.close()

    allowing = server(["127.0.0.0/8"])
    await allowing.start()
    try:
        endpoint = f"127.0.0.1:{allowing.port}"
        (service,) = await clients(endpoint, 1)
        try:
            assert (await service.classify(b"31")).category == "31"
        finally:
            await service.close()
        # Over TCP a client cannot name a file for the GPU host to load.
        with pytest.raises(ClassifierError, match="Unix socket only"):
            await control.reload(parse_endpoint(endpoint), "/etc/passwd", 10.0)
        assert allowing.stats().refused_clients == 0
    finally:
        await allowing.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_triaged_inference_serves_tcp_and_stops_on_sigterm(sockdir: Path) -> None:
    port = free_port()
    config = sockdir / "triaged.toml"
    config.write_text(
        f'[classifier]\nmodel_path = "{DEFAULT_MODEL}"\nprovider = "{provider_setting()}"\n'
        f'[classifier.service]\nlisten = "127.0.0.1:{port}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "inference", "--config", str(config),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    endpoint = f"127.0.0.1:{port}"
    try:
        for _ in range(600):
            if await control.ping(parse_endpoint(endpoint), 1.0) is not None:
                break
            assert proc.returncode is None
            await asyncio.sleep(0.1)
        (service,) = await clients(endpoint, 1)
        try:
            verdict = await service.classify(messages(1, 0)[0])
            assert verdict.model not in ("", FALLBACK_MODEL)
            assert service.model_name == verdict.model
        finally:
            await service.close()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"inference.stopped" in err


async def test_per_connection_counts_stay_bounded(sockdir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import classifier.serving.inference_server as server_mod

    monkeypatch.setattr(server_mod, "MAX_CONNECTION_LABELS", 2)
    model = write_model(sockdir / "echo-a.onnx")
    endpoint = f"unix:{sockdir}/inference.sock"
    server = InferenceServer(settings_for(model), parse_endpoint(endpoint), loader=ECHO)
    await server.start()
    try:
        for n in range(4):  # workers that come and go (a restart, a crash)
            runner = await RemoteRunner.open(settings_for(Path("unused"), endpoint), client=f"worker w{n}")
            verdicts, _ = await runner.classify_batch([b"%d" % n] * (n + 1))
            assert [v.category for v in verdicts if isinstance(v, Classification)] == [str(n)] * (n + 1)
            await runner.close()
            await wait_until(lambda: server.stats().connections == 0, 10)
        stats = server.stats()
    finally:
        await server.close()
    assert stats.requests == 1 + 2 + 3 + 4
    # The two most recent connections' counts are kept, older closed ones went.
    assert sorted(stats.per_connection.values()) == [3, 4], stats.per_connection
    assert all(label.startswith(("worker w2", "worker w3")) for label in stats.per_connection)


# -- the SMTP proxy on the service ---------------------------------------------------------


async def test_smtp_proxy_on_the_service_relays_through_a_service_kill(
    sockdir: Path, capture: CaptureServer,
) -> None:
    from email.parser import BytesParser
    from email.policy import compat32

    from conftest import SmtpTestClient, base_settings

    from proxy.server import Server

    endpoint = f"unix:{sockdir}/inference.sock"
    host = InferenceHost(settings_for(DEFAULT_MODEL, endpoint), endpoint)
    await host.start()
    settings = base_settings(capture.url, classifier={
        "kind": "onnx", "model_path": str(DEFAULT_MODEL), "provider": provider_setting(),
        "runner": "service", "endpoint": endpoint, "timeout_ms": 30_000.0})
    srv = Server(settings)
    await srv.start()
    local = OnnxClassifierService(settings_for(DEFAULT_MODEL, runner="thread"))
    await local.start()

    async def send(raws: list[bytes]) -> list[int]:
        c = await SmtpTestClient.connect(*srv.addresses[0])
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO client.test"))[0] == 250
        codes = [(await c.send_message("a@example.org", ["b@example.net"], r))[0] for r in raws]
        await c.close()
        return codes

    def stamps() -> list[dict[str, str]]:
        out = []
        for got in capture.messages:
            msg = BytesParser(policy=compat32).parsebytes(got.data, headersonly=True)
            out.append({k.lower(): str(v) for k, v in msg.items()})
        return out

    try:
        first = messages(8, 3)
        assert await send(first) == [250] * 8
        expected = [await local.classify(m) for m in first]
        got = stamps()
        assert [(h["x-triage-model"], h["x-triage-category"], h["x-triage-score"])
                for h in got] == [(e.model, e.category, f"{e.score:.3f}") for e in expected]
        pid = host.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Mail keeps flowing while the service is down and restarting: all
        # relayed, the ones without a model verdict stamped by the rules.
        during = await asyncio.gather(*(send(messages(5, 10 + s)) for s in range(4)))
        assert during == [[250] * 5] * 4
        models_during = [h["x-triage-model"] for h in stamps()[8:]]
        assert len(models_during) == 20  # every accepted message reached the next hop
        assert FALLBACK_MODEL in models_during
        assert set(models_during) <= {FALLBACK_MODEL, expected[0].model}
        await wait_until(lambda: host.pid not in (None, pid), 60, what="service restarted")
        for _ in range(200):
            capture.messages.clear()
            await send(messages(1, 99))
            if stamps()[0]["x-triage-model"] == expected[0].model:
                break
            await asyncio.sleep(0.05)
        assert stamps()[0]["x-triage-model"] == expected[0].model
    finally:
        await srv.stop(drain_timeout_s=1.0)
        await local.close()
        await host.close()
    fallbacks = srv.metrics.registry.get_sample_value(
        "triaged_classifier_fallbacks_total", {"reason": "error"})
    assert fallbacks is not None and fallbacks >= models_during.count(FALLBACK_MODEL)
