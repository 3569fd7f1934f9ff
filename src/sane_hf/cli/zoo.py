"""`sane-hf zoo train|import|build|info`: make and inspect model zoos."""

from __future__ import annotations

import contextlib
import json
import sys

from sane_hf.cli.common import check_sources

_ZOO_COMMANDS: list = []  # sub-commands of `sane-hf zoo`


def register(subparsers) -> None:
    """Add `sane-hf zoo` and its sub-commands to the `sane-hf` parser."""
    parser = subparsers.add_parser("zoo", help="train, import, build and inspect model zoos")
    zoo_subparsers = parser.add_subparsers(dest="zoo_command", required=True)
    for add_command in _ZOO_COMMANDS:
        add_command(zoo_subparsers)


def _add_zoo_train_command(zoo_subparsers) -> None:
    from sane_hf.utils.config import add_config_arguments
    from sane_hf.zoo.config import ZooConfig

    parser = zoo_subparsers.add_parser(
        "train",
        help="train a seed or hyperparameter zoo into a raw zoo directory (rerun to resume)",
        description="Train a zoo. Values come from --config (a YAML/JSON file of ZooConfig "
        "fields), then one flag per field (--num-models 50), then --set key=value "
        "(--set dataset_kwargs.num_samples=300). A seed zoo of N models uses seeds "
        "SEED..SEED+N-1, so zoos meant to be independent need seed ranges that do not overlap. "
        "Under torchrun / accelerate launch -m sane_hf the models are shared out over processes.",
    )
    parser.add_argument("--output", required=True, help="raw zoo directory to write (or resume)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(parser, ZooConfig)
    parser.set_defaults(func=_run_zoo_train)


def _run_zoo_train(args) -> int:
    from sane_hf.utils.config import config_from_args
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.training import train_zoo

    config = config_from_args(ZooConfig, args)
    print(train_zoo(config, args.output, progress=not args.no_progress))
    return 0


_ZOO_COMMANDS.append(_add_zoo_train_command)


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
    from sane_hf.zoo.importing import import_zoo

    report = import_zoo(  # a ZooImportError becomes main's one line on stderr, exit 1
        args.source,
        args.output,
        architecture=args.architecture,
        architecture_kwargs=args.architecture_kwargs,
        zoo_info=args.zoo_info,
        strict=args.strict,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0


_ZOO_COMMANDS.append(_add_zoo_import_command)


def _add_zoo_build_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "build",
        help="split, align, normalize and tokenize a raw zoo into a Hugging Face dataset",
    )
    parser.add_argument(
        "raw_zoo_dir",
        nargs="+",
        help="directory with zoo.json, metadata.jsonl, checkpoints/; several (or --universal) "
        "make one mixed dataset of universal tokens",
    )
    parser.add_argument("--output", help="directory to save the dataset to")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push it to this dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--tokensize", type=int, help="values per token (default 289)")
    parser.add_argument("--no-norm-layers", action="store_true", help="leave BatchNorm out")
    parser.add_argument("--no-align", action="store_true", help="skip weight-matching alignment")
    parser.add_argument("--reference", help="model id of the alignment reference")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the by-model split (not a training seed)"
    )
    parser.add_argument("--epochs", type=int, nargs="+", help="keep only these epochs")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="build from the finished models of a zoo whose training or import stopped half-way",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        help="align and tokenize with N worker processes (same dataset as a serial build)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    universal = parser.add_argument_group("universal tokens (mixed zoos)")
    universal.add_argument(
        "--universal", action="store_true", help="universal tokens also for a single zoo"
    )
    universal.add_argument("--token-mode", choices=("row", "dense"), default="dense")
    universal.add_argument("--scale", choices=("none", "fan_in", "layer"), default="fan_in")
    universal.add_argument(
        "--alignment", choices=("none", "canonical"), default="none", help="no reference"
    )
    universal.add_argument("--names", nargs="+", help="one architecture name per zoo")
    parser.set_defaults(func=_run_zoo_build)


def _run_mixed_build(args) -> int:
    import numpy as np

    from sane_hf.weights.universal import TokenScheme
    from sane_hf.zoo.mixed import build_mixed_dataset, save_mixed_dataset

    if args.output is None:
        print("error: a mixed dataset needs --output DIR", file=sys.stderr)
        return 2
    scheme = TokenScheme(
        **({} if args.tokensize is None else {"tokensize": args.tokensize}),
        token_mode=args.token_mode,
        scale=args.scale,
        alignment=args.alignment,
    )
    dataset = build_mixed_dataset(
        args.raw_zoo_dir,
        scheme,
        names=args.names,
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    save_mixed_dataset(dataset, args.output)
    counts = {
        split: dict(zip(*np.unique(rows["architecture"], return_counts=True)))
        for split, rows in dataset.splits.items()
    }
    print(f"saved to {args.output}: {scheme.to_dict()}")
    for split, per_architecture in counts.items():
        print(f"  {split}: " + ", ".join(f"{a} {int(n)}" for a, n in per_architecture.items()))
    return 0


def _run_zoo_build(args) -> int:
    from sane_hf.zoo.storage import dataset_writer_lock

    if len(args.raw_zoo_dir) > 1 or args.universal:
        return _run_mixed_build(args)
    if args.output is None and args.push_to_hub is None:
        print("error: give --output DIR, --push-to-hub REPO or both", file=sys.stderr)
        return 2
    check_sources({"raw_zoo_dir": args.raw_zoo_dir}, local=True)
    # the whole build holds --output's lock: a second build to it is refused at once
    with dataset_writer_lock(args.output) if args.output else contextlib.nullcontext():
        return _build(args)


def _build(args) -> int:
    from pathlib import Path

    from sane_hf.hub import push_zoo_dataset
    from sane_hf.zoo.dataset import build_zoo_dataset
    from sane_hf.zoo.statistics import format_zoo_statistics
    from sane_hf.zoo.storage import save_zoo_dataset

    dataset = build_zoo_dataset(
        args.raw_zoo_dir[0],
        **({} if args.tokensize is None else {"tokensize": args.tokensize}),
        include_norm=not args.no_norm_layers,
        align=not args.no_align,
        reference=args.reference,
        seed=args.seed,
        epochs=args.epochs,
        dtype=args.dtype,
        progress=not args.no_progress,
        allow_incomplete=args.allow_incomplete,
        num_proc=args.num_proc,
    )
    if args.output is not None:
        save_zoo_dataset(dataset, args.output)
        print(f"saved to {args.output}")
    if args.push_to_hub is not None:
        # Without --output the build lives in a temporary folder: keep it if the push fails.
        fallback = None if args.output else Path(args.push_to_hub.split("/")[-1] + "-zoo-dataset")
        commit = push_zoo_dataset(
            dataset, args.push_to_hub, private=args.private or None, keep_on_failure=fallback
        )
        print(f"pushed to {commit.commit_url}")
    print(format_zoo_statistics(dataset.metadata.statistics, dataset.metadata.zoo))
    return 0


_ZOO_COMMANDS.append(_add_zoo_build_command)


def _add_zoo_info_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "info", help="summarize a zoo dataset or raw zoo: models, splits, accuracy per epoch"
    )
    parser.add_argument("path", help="a saved zoo dataset or a raw zoo directory")
    parser.add_argument("--plot", metavar="PNG", help="also plot test accuracy vs epoch")
    parser.set_defaults(func=_run_zoo_info)


def _run_zoo_info(args) -> int:
    from sane_hf.zoo.statistics import format_zoo_statistics, plot_zoo_accuracy, zoo_statistics
    from sane_hf.zoo.storage import load_zoo_records

    check_sources({"path": args.path}, local=True)
    zoo, records, splits = load_zoo_records(args.path)
    print(format_zoo_statistics(zoo_statistics(records, splits), zoo))
    if splits is None:
        print("raw zoo: not split yet (sane-hf zoo build splits it by model)")
    if args.plot:
        plot_zoo_accuracy(records, args.plot)
        print(f"plot written to {args.plot}")
    return 0


_ZOO_COMMANDS.append(_add_zoo_info_command)
