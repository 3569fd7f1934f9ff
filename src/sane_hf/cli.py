"""The ``sane-hf`` command line; each subcommand mirrors a function of the Python API.

Every subcommand is added by one ``_add_<name>_command(subparsers)`` function below that
defines its arguments and sets ``func`` to a handler taking the parsed arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

COMMANDS: list = []  # the _add_*_command functions, in the order they appear in --help
ZOO_COMMANDS: list = []  # the _add_zoo_*_command functions: subcommands of ``sane-hf zoo``


def _add_zoo_command(subparsers) -> None:
    parser = subparsers.add_parser("zoo", help="train, import, build and inspect model zoos")
    zoo_subparsers = parser.add_subparsers(dest="zoo_command", required=True)
    for add_command in ZOO_COMMANDS:
        add_command(zoo_subparsers)


COMMANDS.append(_add_zoo_command)


def _add_zoo_import_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "import",
        help="convert a zoo (Ray Tune trial folders or a safetensors folder) into a raw zoo directory",
    )
    parser.add_argument(
        "source", help="folder of trial folders, or of safetensors + metadata.jsonl"
    )
    parser.add_argument("--output", required=True, help="raw zoo directory to write (or continue)")
    parser.add_argument(
        "--architecture", help="build_model name, e.g. cnn_s (needed for Ray trials)"
    )
    parser.add_argument(
        "--architecture-kwargs", type=json.loads, help="JSON, e.g. '{\"in_channels\": 1}'"
    )
    parser.add_argument(
        "--zoo-info",
        type=json.loads,
        help='extra zoo.json entries as JSON, e.g. \'{"dataset": "mnist"}\'',
    )
    parser.add_argument("--strict", action="store_true", help="stop at the first problem")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_zoo_import)


def _run_zoo_import(args) -> int:
    from .zoo_import import ZooImportError, import_zoo

    try:
        report = import_zoo(
            args.source,
            args.output,
            architecture=args.architecture,
            architecture_kwargs=args.architecture_kwargs,
            zoo_info=args.zoo_info,
            strict=args.strict,
            progress=not args.no_progress,
        )
    except ZooImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


ZOO_COMMANDS.append(_add_zoo_import_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-hf", description="SANE weight-space learning")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
