"""What ``prefixrt train`` and ``prefixrt eval`` share: the model options (each adds its own ``--model``), the
default device, and how a bad input is reported."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_model_options(group: argparse._ArgumentGroup) -> None:
    """``--model-seed``, ``--model-config``, ``--tokenizer`` and ``--device``."""
    group.add_argument(
        "--model-seed", type=int, default=0, help="weight seed of a built-in model (default: 0)"
    )
    group.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config field of a built-in model (e.g. initializer_range=0.1); repeat for several",
    )
    group.add_argument(
        "--tokenizer",
        help="tokenizer directory (default: the model's, else ../shared/data/{gpt2,bart}-tokenizer)",
    )
    group.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def default_device(requested: str | None) -> str:
    """``--device``, else cuda when available."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def run_reporting_errors(
    command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """``body(args)``; a bad input (ValueError, FileNotFoundError, KeyError) is printed as
    ``prefixrt COMMAND: error: ...`` on stderr and returns 2, as argparse does for a bad command line."""
    try:
        return body(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"prefixrt {command}: error: {err}", file=sys.stderr)
        return 2
