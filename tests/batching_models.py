"""Real, small ONNX models for the batcher and service tests.

They are independent of the bundled default model, so these tests pass
whatever state models/ is in. Each model echoes its input in output "y", so a
result handed to the wrong caller is caught; the slow variant also computes a
chain of MatMuls ("h") so that one batch takes measurable time.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from classifier.providers import Provider, ProviderChoice, choose_providers, session_kind
from classifier.types import Classification

DIM = 8


def build_echo_model(*, dim: int = DIM, heavy_layers: int = 0, heavy_dim: int = 256,
                     offset: float = 0.0) -> bytes:
    """y = x + offset; with heavy_layers > 0 also h = tanh chain of MatMuls."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])
    inits = [numpy_helper.from_array(np.array([offset], dtype=np.float32), "offset")]
    nodes = [helper.make_node("Add", ["x", "offset"], ["y"])]
    outputs = [y]
    if heavy_layers:
        rng = np.random.default_rng(0)
        w_in = rng.standard_normal((dim, heavy_dim)) / np.sqrt(dim)
        inits.append(numpy_helper.from_array(w_in.astype(np.float32), "w_in"))
        nodes.append(helper.make_node("MatMul", ["x", "w_in"], ["a0"]))
        prev = "a0"
        for i in range(heavy_layers):
            w = rng.standard_normal((heavy_dim, heavy_dim)) / np.sqrt(heavy_dim)
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"a{i + 1}"]))
            prev = f"a{i + 1}"
        nodes.append(helper.make_node("ReduceSum", [prev], ["h"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "echo", [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def provider_setting() -> str:
    """TRIAGED_TEST_PROVIDER=cuda runs these tests on the GPU (bench/gpu_check.sh)."""
    return os.environ.get("TRIAGED_TEST_PROVIDER", "cpu")


def providers_under_test() -> list[Provider]:
    setting = provider_setting()
    assert setting in ("cpu", "cuda", "auto")
    return choose_providers(setting, 0).providers  # type: ignore[arg-type]


def session(model: bytes, providers: Sequence[Provider] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=list(providers or providers_under_test()))
    if provider_setting() == "cuda":
        # Prove the GPU run really ran on the GPU.
        assert session_kind(sess) == "cuda", sess.get_providers()
    return sess


class EchoRunner:
    """run_batch for the generic batcher: ints in, ints out, through ONNX.

    Records every item it ran (so tests can prove what never ran), and can be
    held at a gate so tests control exactly which requests share a batch.
    """

    def __init__(self, model: bytes, providers: Sequence[Provider] | None = None) -> None:
        self.session = session(model, providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ran: list[int] = []
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison: set[int] = set()
        self.short: set[int] = set()  # a batch holding one of these loses an output
        self.bad_item: set[int] = set()  # answered with a per-item exception

    def __call__(self, items: list[int]) -> list[int | Exception]:
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        self.batches.append(list(items))
        self.ran.extend(items)
        if self.poison.intersection(items):
            raise ValueError("poisoned batch")
        x = np.repeat(np.asarray(items, dtype=np.float32)[:, None], DIM, axis=1)
        y = self.session.run(self.outputs, {"x": x})[0]
        out: list[int | Exception] = [round(float(v)) for v in y[:, 0]]
        if self.short.intersection(items):
            out = out[:-1]
        return [ValueError("bad item") if i in self.bad_item else o
                for i, o in zip(items, out, strict=False)]


class EchoModel:
    """The LoadedModel shape the service expects (featurize / predict /
    name_version), over a real ONNX echo model: raw b"17" -> category "17"."""

    def __init__(self, path: str | Path, providers: Sequence[Provider] | None = None) -> None:
        data = Path(path).read_bytes()
        self.session = session(data, providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.name_version = Path(path).stem
        self.manifest: dict[str, object] = {"name": self.name_version}
        self.offset = float(numpy_helper.to_array(
            next(i for i in onnx.load_from_string(data).graph.initializer if i.name == "offset")
        )[0])

    def featurize(self, raw: bytes) -> np.ndarray:
        if raw == b"unparseable":
            raise ValueError("cannot featurize")
        # The service's warm-up message is not a number: -1.
        return np.full(DIM, float(int(raw)) if raw.isdigit() else -1.0, dtype=np.float32)

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        y = self.session.run(self.outputs, {"x": np.stack(batch)})[0]
        return [
            Classification(category=str(round(float(v - self.offset))), score=1.0,
                           model=self.name_version)
            for v in y[:, 0]
        ]


def load_echo(path: str, choice: ProviderChoice, threads: int) -> EchoModel:
    """A service loader by name ("batching_models:load_echo"): the inference
    process imports it, so it must live in a module, not in a test."""
    del threads
    return EchoModel(path, choice.providers)


def process_exited(pid: int) -> bool:
    """Dead with all its threads gone, not yet reaped by its parent (a zombie):
    what the parent's next poll() sees as exited."""
    status = Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" in status and "Threads:\t1\n" in status


# A message carrying this header kills the inference process that featurizes
# it, mid-batch, as a crash in the model runtime would.
CRASH_HEADER = b"X-Test-Crash-Inference: now"


class _CrashingModel:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.name_version = model.name_version
        self.manifest = model.manifest

    def featurize(self, raw: bytes) -> np.ndarray:
        if CRASH_HEADER in raw:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model.featurize(raw)  # type: ignore[no-any-return]

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        return self.model.predict(batch)  # type: ignore[no-any-return]


def load_crashing_model(path: str, choice: ProviderChoice, threads: int) -> _CrashingModel:
    """A real triaged model ("batching_models:load_crashing_model") that
    SIGKILLs its own process on a message with CRASH_HEADER."""
    from classifier.inference import load_onnx_model

    return _CrashingModel(load_onnx_model(path, choice, threads))


# Messages that make the inference process break the wire's question-and-answer
# order, as a bug in the child (or a stray write from a native library) would.
STRAY_AFTER = b"stray-after"  # an extra frame after this batch's answer
WRONG_ANSWER = b"wrong-answer"  # a Ready frame where this batch's answer belongs


class _OutOfStepModel:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.name_version = model.name_version
        self.manifest = model.manifest

    @staticmethod
    def _send_to_parent(frame: Any, delay_s: float = 0.0) -> None:
        import socket
        import time

        from classifier import worker_wire as wire

        time.sleep(delay_s)
        # The process's own end of the socketpair (worker_process's argv[1]).
        with socket.socket(fileno=os.dup(int(sys.argv[1]))) as sock:
            wire.send(sock, frame)

    def featurize(self, raw: bytes) -> np.ndarray:
        from classifier import worker_wire as wire

        frame = wire.Ready(self.name_version, "cpu", "test", None, None)
        if raw == WRONG_ANSWER:
            self._send_to_parent(frame)
        elif raw == STRAY_AFTER:  # once the answer is out and the process waits for the next Run
            threading.Thread(target=self._send_to_parent, args=(frame, 0.3), daemon=True).start()
        return self.model.featurize(raw)  # type: ignore[no-any-return]

    def predict(self, batch: Sequence[np.ndarray]) -> list[Classification]:
        return self.model.predict(batch)  # type: ignore[no-any-return]


def load_out_of_step_echo(path: str, choice: ProviderChoice, threads: int) -> _OutOfStepModel:
    """The echo model ("batching_models:load_out_of_step_echo") that writes
    frames out of turn on STRAY_AFTER and WRONG_ANSWER."""
    return _OutOfStepModel(load_echo(path, choice, threads))


def write_model(path: Path, **kwargs: object) -> Path:
    path.write_bytes(build_echo_model(**kwargs))  # type: ignore[arg-type]
    return path


# -- a real triaged model, trained in seconds -----------------------------------
# For end-to-end tests of the proxy with the ONNX classifier: they must not
# depend on models/default.onnx (its owner may be mid-retrain), so they train
# their own tiny model through the real `triaged train`.

_WORDS = {
    "primary": "dinner weekend kids birthday visit photos holiday lunch call tomorrow".split(),
    "updates": "order shipped tracking receipt password reset account statement invoice".split(),
    "forums": "patch thread kernel release proposal vote review mailing discussion".split(),
    "spam": "winner prize claim free money viagra urgent bank transfer lottery".split(),
}
_FROM = {
    "primary": "Mum <mum@home.example>",
    "updates": "Shop <orders@shop.example>",
    "forums": "Dev <dev{n}@people.example>",
    "spam": "WINNER <x{n}@prize.example>",
}


def tiny_message(kind: str, n: int, seed: int = 0) -> bytes:
    import random

    rng = random.Random(f"{kind}{n}{seed}")
    body = " ".join(rng.choice(_WORDS[kind]) for _ in range(40))
    return (
        f"From: {_FROM[kind].format(n=n)}\r\nTo: me@example.org\r\n"
        f"Subject: {' '.join(rng.choice(_WORDS[kind]) for _ in range(4))}\r\n"
        f"Message-ID: <{kind}{n}.{seed}@example>\r\n\r\n{body}\r\n"
    ).encode()


def train_tiny_model(workdir: Path, out: Path, *, name: str, version: str = "1",
                     relabel: dict[str, str] | None = None) -> Path:
    """primary / updates / forums categories plus a spam head, via `triaged train`.
    `relabel`: kind -> the folder its messages go to (a model that disagrees)."""
    from proxy.__main__ import main

    data = workdir / f"data-{name}"
    for kind in _WORDS:
        folder = data / (relabel or {}).get(kind, kind)
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(40):
            (folder / f"{n}.eml").write_bytes(tiny_message(kind, n))
    rc = main(["train", str(data), "--out", str(out), "--name", name, "--version", version,
               "--epochs", "8", "--buckets", "4096", "--quiet", "--no-int8"])
    assert rc == 0 and out.exists(), f"triaged train failed ({rc})"
    return out
