"""`sane-hf demo`: the whole workflow on the embedded default zoo (`sane_hf.recipes.demo`)."""

from __future__ import annotations

from sane_hf.utils.config import add_source_arguments


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="the whole workflow on digits: zoo, dataset, SANE, probes, sampling (about a minute "
        "on an idle 2-core CPU; --quick: seconds)",
        description="Train a CNN-s zoo on scikit-learn's digits, build its dataset, pretrain a "
        "tiny SANE, then print the property-prediction and sampling tables. Time: about a "
        "minute with OMP_NUM_THREADS=1 on an idle 2-core CPU (longer when other work shares "
        "the CPU); --quick runs every stage in seconds. Rerun to resume.",
    )
    parser.add_argument("--output-dir", default="demo_outputs", help="where everything goes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings that run every stage in seconds (the numbers mean nothing)",
    )
    add_source_arguments(parser, "demo", "DemoConfig sections (zoo, pretraining, sampling)")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from sane_hf.recipes.demo import DemoConfig, run_demo

    if args.quick and args.config:
        raise ValueError("--quick is the preset `quick`: give --quick or --config, not both")
    source = args.config or ("quick" if args.quick else "default")
    run_demo(args.output_dir, DemoConfig.load(source, overrides=args.overrides))
    return 0
