"""`triaged` command line: serve, check-config, and the classifier's train/evaluate/classify."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy.settings import EX_CONFIG


def build_parser() -> argparse.ArgumentParser:
    from classifier import cli as classifier_cli
    from proxy import feedback_cli, inference_cli, learn_cli

    parser = argparse.ArgumentParser(prog="triaged", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the filter")
    serve.add_argument("--config", help="TOML config (default: embedded defaults)")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="print the effective config or its errors")
    check.add_argument("path")
    check.set_defaults(func=_check_config)

    classifier_cli.add_subcommands(sub)
    feedback_cli.add_subcommands(sub)
    learn_cli.add_subcommands(sub)
    inference_cli.add_subcommands(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from proxy.malloc import fix_mmap_threshold
    from proxy.server import serve_forever
    from proxy.settings import ConfigError, load_settings

    fix_mmap_threshold()  # large messages' buffers go back to the kernel when freed

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"triaged: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    from proxy.gcpolicy import settle_heap

    settle_heap()  # the start-up heap out of the collector's full scans (proxy/gcpolicy.py)
    return serve_forever(settings, args.config)


def _check_config(args: argparse.Namespace) -> int:
    from proxy.settings import ConfigError, dump_toml, load_settings

    try:
        settings = load_settings(args.path)
    except ConfigError as exc:
        print(f"triaged: config: {exc}", file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(dump_toml(settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
