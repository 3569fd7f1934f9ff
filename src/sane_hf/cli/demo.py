"""`sane-hf demo`: the whole workflow on the embedded default zoo."""

from __future__ import annotations

_COMMANDS: list = []


def _add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole workflow on digits: zoo, dataset, SANE, probes, sampling (CPU, ~15 min)",
        description="Train a CNN-s zoo on scikit-learn's digits, build its dataset, pretrain a "
        "tiny SANE, then print the property-prediction and sampling tables. Rerun to resume.",
    )
    parser.add_argument("--output-dir", default="demo_outputs", help="where everything goes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings that run every stage in under a minute (the numbers mean nothing)",
    )
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from sane_hf.recipes.demo import DemoConfig, run_demo

    run_demo(args.output_dir, DemoConfig.quick() if args.quick else DemoConfig())
    return 0


_COMMANDS.append(_add_demo_command)


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    for add_command in _COMMANDS:
        add_command(subparsers)
