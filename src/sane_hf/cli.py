"""The ``sane-hf`` command line; each subcommand mirrors a function of the Python API.

Every subcommand is added by one ``_add_<name>_command(subparsers)`` function below that
defines its arguments and sets ``func`` to a handler taking the parsed arguments.
"""

from __future__ import annotations

import argparse

COMMANDS: list = []  # the _add_*_command functions, in the order they appear in --help
ZOO_COMMANDS: list = []  # the _add_zoo_*_command functions: subcommands of ``sane-hf zoo``


def _add_zoo_command(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="train, import, build and inspect model zoos")
    zoo_subparsers = parser.add_subparsers(dest="zoo_command", required=True)
    for add_command in ZOO_COMMANDS:
        add_command(zoo_subparsers)


COMMANDS.append(_add_zoo_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-hf", description="SANE weight-space learning")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
