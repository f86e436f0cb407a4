"""`triaged inference --config PATH`: the inference service on its own.

For the micro-service split: a GPU host runs this, listening on
classifier.service.listen ("host:port", with classifier.service.allowed_clients),
and front-end hosts set classifier.runner = "service" and classifier.endpoint
to it. SIGTERM stops it after answering what is queued; SIGHUP reloads the
model (classifier.model_path), keeping the old one if the new one fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.settings import EX_CONFIG


def add_subcommands(sub: Any) -> None:
    p = sub.add_parser(
        "inference",
        help="run the shared inference service (classifier.service.listen)",
        description="Serve the model to triaged workers on this and other hosts: batches "
        "across all their connections, CUDA when present. SIGHUP reloads the model.",
    )
    p.add_argument("--config", help="TOML config (default: embedded defaults)")
    p.add_argument("--listen", help="override classifier.service.listen")
    p.set_defaults(func=_inference)


def _inference(args: argparse.Namespace) -> int:
    import asyncio

    from classifier.child_logging import configure_child_logging
    from classifier.serving.endpoints import parse_endpoint
    from classifier.serving.inference_server import serve
    from proxy.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        if args.listen:
            parse_endpoint(args.listen)
    except ConfigError as exc:
        print(f"triaged: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ValueError as exc:
        print(f"triaged: --listen: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure_child_logging("inference-service")
    listen = args.listen or settings.classifier.service.listen
    return asyncio.run(serve(settings.classifier, listen))


__all__ = ["add_subcommands"]
