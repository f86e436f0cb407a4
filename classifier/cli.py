"""`triaged train | evaluate | classify` (filled in by the classifier work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_subcommands(sub: Any) -> None:
    """Register the classifier's subcommands on the `triaged` parser."""
    del sub  # train/evaluate/classify land with the ONNX classifier


__all__ = ["add_subcommands", "argparse"]
