"""The inference process: `python -m classifier.worker_process FD`.

triaged starts one per loaded model (classifier/process_runner.py) and hands it
one end of a socketpair as FD. It loads the model, answers Ready, then turns
each Run (a batch of raw messages) into Results: features, one model call,
overrides. It has a GIL and a core of its own, so feature extraction (Python)
never competes with the SMTP event loop, and a crash in the model runtime
costs one batch instead of the mail server.

It exits on Stop, or when the parent's end closes (the parent died).
"""

from __future__ import annotations

import signal
import socket
import sys

from classifier import worker_wire as wire
from classifier.child_logging import configure_child_logging
from classifier.inference import (
    BatchModel,
    classify_batch,
    labels_of,
    load_and_warm,
    prefix_bytes_of,
    resolve_loader,
)
from classifier.types import ClassifierError


def _start(sock: socket.socket) -> tuple[BatchModel, wire.Start] | None:
    start = wire.receive_in_child(sock)
    if not isinstance(start, wire.Start):
        wire.send(sock, wire.Failed(f"expected Start, got {type(start).__name__}"))
        return None
    try:
        loader = resolve_loader(start.loader)
        model, choice = load_and_warm(
            start.model_path, start.provider, start.device_id, start.threads, loader,
            start.shadow_model_path,
        )
    except Exception as exc:  # reported to the parent, which logs and decides
        message = str(exc) if isinstance(exc, ClassifierError) else f"{type(exc).__name__}: {exc}"
        wire.send(sock, wire.Failed(message))
        return None
    wire.send(sock, wire.Ready(model.name_version, choice.kind, choice.reason, choice.device_id,
                               prefix_bytes_of(model)))
    return model, start


def _serve(sock: socket.socket, model: BatchModel, start: wire.Start) -> None:
    labels = labels_of(model)
    trusted = frozenset(a.lower() for a in start.trusted_authserv_ids)
    while True:
        frame = wire.receive_in_child(sock)
        if isinstance(frame, wire.Stop):
            return
        if not isinstance(frame, wire.Run):
            wire.send(sock, wire.BatchFailed(f"unexpected {type(frame).__name__}"))
            continue
        try:
            verdicts, timing = classify_batch(
                model, frame.raws, overrides=start.overrides, labels=labels, trusted=trusted
            )
        except Exception as exc:  # the model call failed: this batch only
            wire.send(sock, wire.BatchFailed(f"{type(exc).__name__}: {exc}"))
            continue
        wire.send(sock, wire.Results(
            [v if not isinstance(v, Exception) else str(v) for v in verdicts], timing
        ))




def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m classifier.worker_process FD", file=sys.stderr)
        return 64
    # SIGINT/SIGTERM from a terminal or systemd reach the whole process group;
    # the parent decides when this process stops (it drains first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_child_logging("inference")
    sock = socket.socket(fileno=int(argv[0]))
    try:
        started = _start(sock)
        if started is not None:
            _serve(sock, *started)
    except (wire.ChannelClosed, ConnectionError):
        pass  # the parent is gone: nothing left to answer
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
