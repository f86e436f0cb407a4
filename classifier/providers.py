"""Choose onnxruntime execution providers from the classifier settings.

"cpu": CPU. "cuda": CUDA or fail at start (the operator asked for it).
"auto": CUDA when onnxruntime-gpu is installed, a GPU answers and a session
really comes up on CUDA; CPU otherwise. The check goes as far as building a
session, because onnxruntime silently falls back to CPU when the CUDA
libraries (cuDNN, cuBLAS) do not load: `get_available_providers()` lists what
the wheel was built with, not what works on this machine.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import onnxruntime as ort
import structlog

from classifier.types import ClassifierError

log = structlog.get_logger("triaged.classifier")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# A 67-byte ONNX model, y = x + x (opset 13), to probe a provider without
# needing the `onnx` package at run time.
_PROBE_MODEL = base64.b64decode(
    "CAc6OQoOCgF4CgF4EgF5IgNBZGQSBXByb2JlWg8KAXgSCgoICAESBAoCCAFiDwoBeRIKCggIARIECgIIAUIECgAQDQ=="
)

Provider = str | tuple[str, dict[str, Any]]


class ProviderError(ClassifierError):
    """The requested execution provider cannot run here."""


@dataclass(frozen=True)
class ProviderChoice:
    kind: Literal["cuda", "cpu"]
    providers: list[Provider]  # what to pass to InferenceSession(providers=...)
    reason: str  # why, for the start-up log line
    device_id: int | None = None


def _cpu(reason: str) -> ProviderChoice:
    return ProviderChoice("cpu", [CPU], reason)


def _cuda_providers(device_id: int) -> list[Provider]:
    return [(CUDA, {"device_id": device_id}), CPU]


def cuda_problem(device_id: int) -> str | None:
    """None when a session really runs on CUDA device `device_id`, else why not."""
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install the 'gpu' extra)"
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        # onnxruntime-gpu >= 1.21 finds CUDA/cuDNN from the nvidia-* wheels
        # only when asked to; a failure here shows up in the probe below.
        with contextlib.suppress(Exception):
            preload()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the CPU fallback warning is reported by us
    try:
        session = ort.InferenceSession(_PROBE_MODEL, opts, providers=_cuda_providers(device_id))
    except Exception as exc:
        return f"CUDA session failed: {type(exc).__name__}: {exc}"
    used = session.get_providers()
    if not used or used[0] != CUDA:
        return f"CUDA libraries did not load (session providers: {used})"
    return None


def choose_providers(provider: Literal["auto", "cpu", "cuda"], device_id: int = 0) -> ProviderChoice:
    """Resolve the settings' `provider` to a concrete list; raises ProviderError
    when "cuda" was asked for and cannot be had."""
    if provider == "cpu":
        return _cpu("configured")
    problem = cuda_problem(device_id)
    if problem is None:
        return ProviderChoice("cuda", _cuda_providers(device_id), "CUDA session verified", device_id)
    if provider == "cuda":
        raise ProviderError(f"provider = \"cuda\" but {problem}")
    return _cpu(f"auto: {problem}")


def session_kind(session: Any) -> Literal["cuda", "cpu"]:
    """Which provider a built InferenceSession really runs on first."""
    used = session.get_providers()
    return "cuda" if used and used[0] == CUDA else "cpu"


def log_choice(choice: ProviderChoice, model: str) -> None:
    log.info(
        "classifier.provider",
        provider=choice.kind,
        device_id=choice.device_id,
        reason=choice.reason,
        model=model,
    )
