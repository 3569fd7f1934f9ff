"""`sane-hf pretrain`: SANE pretraining with Accelerate, then the probe heads that ship with the model
(`sane_hf.recipes.pretraining.pretrain`)."""

from __future__ import annotations

import json

from sane_hf.cli.common import check_sources
from sane_hf.utils.config import add_config_arguments, preset_names


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    from sane_hf.pretraining.config import PretrainingConfig

    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain SANE on a zoo dataset (Accelerate; preset or YAML + flags + --set)",
        description="Pretrain SANE on a zoo dataset. Values come from --config (a preset: "
        f"{', '.join(preset_names('pretraining'))}; or a YAML/JSON file), then the flags "
        "(--learning-rate 3e-4), then --set key=value (--set model.d_model=64). Resume a killed "
        "run with --resume-from-checkpoint latest. For several GPUs: accelerate launch -m "
        "sane_hf pretrain with the same arguments.",
    )
    add_config_arguments(parser, PretrainingConfig)
    parser.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    import logging

    from sane_hf.pretraining.config import PretrainingConfig
    from sane_hf.recipes.pretraining import pretrain
    from sane_hf.utils.config import config_from_args

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    config = config_from_args(PretrainingConfig, args)
    check_sources({"--dataset": config.dataset})
    summary = pretrain(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "processes"}, indent=1))
    return 0
