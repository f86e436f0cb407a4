"""Classifier settings. Owned here (the classifier never imports `proxy`);
`proxy.settings` embeds them under `[classifier]`."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class BatcherSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # A batch closes at max_batch_size requests or max_wait_ms after its first.
    max_batch_size: Annotated[int, Meta(ge=1, le=4096)] = 64
    max_wait_ms: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    # Bound on waiting requests; past it callers get Overloaded at once.
    queue_size: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096


class ClassifierSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # "onnx": the model at model_path; "rules": header rules only.
    kind: Literal["onnx", "rules"] = "onnx"
    model_path: str = "models/default.onnx"
    # Header rules override the model where they are sure (list headers -> forums, ...).
    rule_overrides: bool = True
    # Deadline for one classification, queue wait included (the batcher owns
    # it); past it the message gets the header rules' verdict.
    timeout_ms: Annotated[float, Meta(gt=0, le=60_000)] = 2000.0
    # "auto": CUDA when onnxruntime-gpu and a GPU are present, else CPU.
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    device_id: Annotated[int, Meta(ge=0)] = 0
    intra_op_num_threads: Annotated[int, Meta(ge=0, le=256)] = 1
    # Where features and the model run. "process": an inference process of
    # its own (its own GIL and core; after a crash or hang it is restarted, and
    # only the message that crashed it fails). "thread": the inference thread
    # of this process, sharing the GIL with SMTP (small hosts, debugging).
    runner: Literal["process", "thread"] = "process"
    batcher: BatcherSettings = BatcherSettings()
    # authserv-ids (RFC 8601) of the verifiers upstream whose
    # Authentication-Results fields are believed (OpenDKIM/OpenDMARC/rspamd on
    # this site's border, e.g. "mx.example.org"). A DMARC, DKIM or SPF failure
    # they record raises the spam score by fixed log-odds (classifier/auth.py).
    # Empty: every Authentication-Results field is ignored (anyone can write one).
    trusted_authserv_ids: list[
        Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\s;()]+$")]
    ] = msgspec.field(default_factory=list)
