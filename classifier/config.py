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


class ServiceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The shared inference service's own side (classifier/serving/): where
    `triaged inference` listens. Workers find it through classifier.endpoint."""

    # "unix:/path" (workers on this host: the file mode is the access control)
    # or "host:port" (front-end hosts share this GPU host; allowed_clients
    # applies).
    listen: str = "unix:/run/triaged/inference.sock"
    # TCP clients outside these CIDR blocks are refused at accept.
    allowed_clients: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Mode of the Unix socket file: 0o600 only triaged's user, 0o660 its group too.
    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o600


class ClassifierSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # "onnx": the model at model_path; "rules": header rules only.
    kind: Literal["onnx", "rules"] = "onnx"
    model_path: str = "models/default.onnx"
    # Shadow mode: a candidate model (`triaged learn --no-promote` writes one)
    # classifies every message beside model_path. Its verdicts are never
    # stamped; events carry them (shadow_*) and triaged_shadow_verdicts_total
    # counts its agreement with the serving model, so a postmaster sees how
    # often it would have decided otherwise before `triaged promote`. It must
    # share model_path's features (a `triaged learn` candidate does). A shadow
    # that does not load is logged and left out; one whose call fails costs no verdict.
    shadow_model_path: str = ""
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
    # "service": a shared inference service (classifier/serving/) at
    # `endpoint`, which batches the model calls of every worker of a host
    # (or of several hosts); this process only featurizes.
    runner: Literal["process", "thread", "service"] = "process"
    # The inference service for runner = "service": "unix:/path" or
    # "host:port". Unreachable: messages get the header rules' verdict until
    # it answers again.
    endpoint: str = ""
    batcher: BatcherSettings = BatcherSettings()
    # authserv-ids (RFC 8601) of the verifiers upstream whose
    # Authentication-Results fields are believed (OpenDKIM/OpenDMARC/rspamd on
    # this site's border, e.g. "mx.example.org"). A DMARC, DKIM or SPF failure
    # they record raises the spam score by fixed log-odds (classifier/auth.py).
    # Empty: every Authentication-Results field is ignored (anyone can write one).
    trusted_authserv_ids: list[
        Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\s;()]+$")]
    ] = msgspec.field(default_factory=list)
    service: ServiceSettings = ServiceSettings()


def config_problems(s: ClassifierSettings) -> list[str]:
    """Checks msgspec types cannot express; one "classifier.key: problem" each."""
    import ipaddress

    from classifier.serving.endpoints import parse_endpoint

    errors: list[str] = []
    if s.endpoint:
        try:
            parse_endpoint(s.endpoint)
        except ValueError as exc:
            errors.append(f"classifier.endpoint: {exc}, got {s.endpoint!r}")
    try:
        parse_endpoint(s.service.listen)
    except ValueError as exc:
        errors.append(f"classifier.service.listen: {exc}, got {s.service.listen!r}")
    for i, cidr in enumerate(s.service.allowed_clients):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            errors.append(f"classifier.service.allowed_clients[{i}]: not a CIDR network: {cidr!r}")
    return errors
