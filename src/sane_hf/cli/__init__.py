"""The `sane-hf` command line (also `python -m sane_hf`).

One module per command group; each exposes `register(subparsers)`, which adds its argparse
sub-commands with `set_defaults(func=handler)`. A handler calls one public API function and
prints its result.
"""

from __future__ import annotations

import argparse
import importlib

# The command groups, in the order they appear in --help.
COMMAND_MODULES = ["zoo", "pretrain", "probe", "embed", "sample", "demo", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-hf", description="SANE weight-space learning")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"sane_hf.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
