"""`sane-hf sample`: new networks from a pretrained SANE (`sane_hf.recipes.sampling`)."""

from __future__ import annotations

from sane_hf.cli.common import add_device_argument, check_sources
from sane_hf.downstream.kde_modes import KDE_MODES
from sane_hf.recipes.settings import DEFAULT_METHODS, SAMPLING_KINDS, SamplingSettings
from sane_hf.utils.config import add_config_arguments


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    parser = subparsers.add_parser(
        "sample",
        help="sample networks from SANE (KDE around prompts, subsampling, bootstrapping, prior) "
        "and fine-tune them next to networks trained from scratch",
        description="Sample networks with each --methods, fine-tune them and networks trained "
        "from scratch for --finetune-epochs, and write samples/<method>/*.safetensors, "
        "sampling.json and sampling.png to --output-dir. Settings: --config (a SamplingSettings "
        "YAML/JSON file), then the flags, then --set key=value. A zoo with fewer checkpoints "
        "than --num-prompts gives all of them as prompts.",
    )
    parser.add_argument("--model", required=True, help="SANE checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="zoo dataset SANE was trained on")
    parser.add_argument("--output-dir", required=True, help="where samples and results go")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=SAMPLING_KINDS,
        default=list(DEFAULT_METHODS),
        help=f"sampling methods, one evaluated group each (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--mode", choices=KDE_MODES, default="shared", help="KDE mode")
    parser.add_argument("--prompt-dataset", help="zoo dataset of another task to take prompts from")
    parser.add_argument(
        "--task-dataset", help="task to score and fine-tune on (default: the prompts' zoo task)"
    )
    add_config_arguments(parser, SamplingSettings)
    add_device_argument(parser)
    parser.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    from sane_hf.recipes.sampling import sample_networks
    from sane_hf.recipes.settings import SamplingMethod
    from sane_hf.utils.config import config_from_args
    from sane_hf.zoo.distributed import is_main_process

    check_sources(
        {"--model": args.model, "--dataset": args.dataset, "--prompt-dataset": args.prompt_dataset}
    )
    results = sample_networks(
        args.model,
        args.dataset,
        args.output_dir,
        config_from_args(SamplingSettings, args),
        [SamplingMethod(kind, args.mode) for kind in args.methods],
        prompt_dataset=args.prompt_dataset,
        task_dataset=args.task_dataset,
        device=args.device,
    )
    if is_main_process():  # under a launcher every process holds the results
        print(results.table())
        print(f"samples, sampling.json and the plots written to {args.output_dir}")
    return 0
