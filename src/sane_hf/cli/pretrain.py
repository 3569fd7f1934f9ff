"""`sane-hf pretrain`: the Accelerate pretraining script."""

from __future__ import annotations

import json

_COMMANDS: list = []


def _add_pretrain_command(subparsers) -> None:
    from sane_hf.pretraining.loop import build_argument_parser

    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain SANE on a zoo dataset (Accelerate; YAML config + overrides)",
        description="Pretrain SANE on a zoo dataset: --config YAML (training/configs/*.yaml), "
        "then plain flags (--learning-rate 3e-4), then --set key=value (--set model.d_model=64). "
        "For several GPUs: accelerate launch training/pretrain.py with the same arguments.",
    )
    build_argument_parser(parser)
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from sane_hf.pretraining.loop import run

    summary = run(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "processes"}, indent=1))
    return 0


_COMMANDS.append(_add_pretrain_command)


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    for add_command in _COMMANDS:
        add_command(subparsers)
