"""``prefixrt`` command line: one sub-command per module in :mod:`prefixrt.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules; one that fails to import (missing optional dependency) is reported when it is used.
COMMANDS = ("demo", "train", "eval", "bench", "serve")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="prefixrt", description="Mixed-prefix prefix-tuning for GPT-2 and BART."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"prefixrt.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"prefixrt.commands.{name}":
                continue  # not part of this build
            raise
        modules[module.NAME] = module
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP, description=module.HELP))
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
