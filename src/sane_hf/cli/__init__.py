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


def _add_zoo_train_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "train",
        help="train a seed or hyperparameter zoo into a raw zoo directory (rerun to resume)",
    )
    parser.add_argument("--output", required=True, help="raw zoo directory to write (or resume)")
    parser.add_argument("--config", help="YAML or JSON file of ZooConfig fields; flags override it")
    parser.add_argument("--architecture", help="build_model name (default cnn_s)")
    parser.add_argument(
        "--dataset", help="digits (default), mnist, mnist1d, an .npz file or an image folder"
    )
    parser.add_argument("--num-samples", type=int, help="train on a stratified subsample")
    parser.add_argument("--kind", choices=("seed", "hyperparameter"), help="default seed")
    parser.add_argument("--num-models", type=int, help="seeds, or grid sub-sample (default 100)")
    parser.add_argument("--seed", type=int, help="first seed (default 0)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 50)")
    parser.add_argument(
        "--checkpoint-epochs", type=int, nargs="+", help="default: every epoch (0 and last always)"
    )
    parser.add_argument("--batch-size", type=int, help="default 10")
    parser.add_argument("--models-per-chunk", type=int, help="models trained at once (default 50)")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (GPU)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run_zoo_train)


def _run_zoo_train(args) -> int:
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.training import train_zoo

    values = ZooConfig.from_file(args.config).to_dict() if args.config else {}
    for name in (
        "architecture",
        "dataset",
        "kind",
        "num_models",
        "seed",
        "epochs",
        "checkpoint_epochs",
        "batch_size",
        "models_per_chunk",
        "device",
        "bf16",
    ):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.num_samples is not None:
        values["dataset_kwargs"] = {
            **values.get("dataset_kwargs", {}),
            "num_samples": args.num_samples,
        }
    print(train_zoo(ZooConfig.from_dict(values), args.output, progress=not args.no_progress))
    return 0


ZOO_COMMANDS.append(_add_zoo_train_command)


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
    from sane_hf.zoo.importing import ZooImportError, import_zoo

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


def _add_zoo_build_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "build",
        help="split, align, normalize and tokenize a raw zoo into a Hugging Face dataset",
    )
    parser.add_argument("raw_zoo_dir", help="directory with zoo.json, metadata.jsonl, checkpoints/")
    parser.add_argument("--output", help="directory to save the dataset to")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push it to this dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--tokensize", type=int, default=289, help="values per token (default 289)")
    parser.add_argument("--no-norm-layers", action="store_true", help="leave BatchNorm out")
    parser.add_argument("--no-align", action="store_true", help="skip weight-matching alignment")
    parser.add_argument("--reference", help="model id of the alignment reference")
    parser.add_argument("--seed", type=int, default=0, help="seed of the by-model split")
    parser.add_argument("--epochs", type=int, nargs="+", help="keep only these epochs")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_run_zoo_build)


def _run_zoo_build(args) -> int:
    from sane_hf.hub import push_zoo_dataset
    from sane_hf.zoo.dataset import build_zoo_dataset, save_zoo_dataset, zoo_metadata
    from sane_hf.zoo.statistics import format_zoo_statistics

    if args.output is None and args.push_to_hub is None:
        print("error: give --output DIR, --push-to-hub REPO or both", file=sys.stderr)
        return 2
    dataset = build_zoo_dataset(
        args.raw_zoo_dir,
        tokensize=args.tokensize,
        include_norm=not args.no_norm_layers,
        align=not args.no_align,
        reference=args.reference,
        seed=args.seed,
        epochs=args.epochs,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if args.output is not None:
        save_zoo_dataset(dataset, args.output)
        print(f"saved to {args.output}")
    if args.push_to_hub is not None:
        commit = push_zoo_dataset(dataset, args.push_to_hub, private=args.private or None)
        print(f"pushed to {commit.commit_url}")
    metadata = zoo_metadata(dataset)
    print(format_zoo_statistics(metadata.statistics, metadata.zoo))
    return 0


ZOO_COMMANDS.append(_add_zoo_build_command)


def _add_zoo_info_command(zoo_subparsers) -> None:
    parser = zoo_subparsers.add_parser(
        "info", help="summarize a zoo dataset or raw zoo: models, splits, accuracy per epoch"
    )
    parser.add_argument("path", help="a saved zoo dataset or a raw zoo directory")
    parser.add_argument("--plot", metavar="PNG", help="also plot test accuracy vs epoch")
    parser.set_defaults(func=_run_zoo_info)


def _run_zoo_info(args) -> int:
    from sane_hf.zoo.dataset import load_zoo_records
    from sane_hf.zoo.statistics import format_zoo_statistics, plot_zoo_accuracy, zoo_statistics

    zoo, records, splits = load_zoo_records(args.path)
    print(format_zoo_statistics(zoo_statistics(records, splits), zoo))
    if splits is None:
        print("raw zoo: not split yet (sane-hf zoo build splits it by model)")
    if args.plot:
        plot_zoo_accuracy(records, args.plot)
        print(f"plot written to {args.plot}")
    return 0


ZOO_COMMANDS.append(_add_zoo_info_command)


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


COMMANDS.append(_add_pretrain_command)


def _add_window_arguments(parser) -> None:
    """Halo-window and device flags shared by ``probe`` and ``sample``."""
    parser.add_argument(
        "--window", type=int, help="content tokens per window (default: half the training window)"
    )
    parser.add_argument("--halo", type=int, help="context tokens on each side (default: a quarter)")
    parser.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    parser.add_argument("--device", help="where SANE runs (default: cuda when available, else cpu)")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _add_probe_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="linear probes of SANE embeddings for model properties, next to s(W) and W baselines",
    )
    parser.add_argument("--model", required=True, help="SANE checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="zoo dataset folder or Hub id")
    parser.add_argument("--output-dir", help="write probe.json (and probe.png) here")
    parser.add_argument(
        "--properties",
        nargs="+",
        help="columns to predict (default: all numeric + categorical hyperparameters)",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=["s(W)", "W"], help="s(W) and/or W; none to skip"
    )
    parser.add_argument(
        "--max-raw-features", type=int, default=50_000, help="largest model for the W baseline"
    )
    parser.add_argument(
        "--layer-means", action="store_true", help="also probe per-layer mean latents"
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help="scatter plots of predicted vs true (needs --output-dir)",
    )
    _add_window_arguments(parser)
    parser.set_defaults(func=_run_probe)


def _run_probe(args) -> int:
    from pathlib import Path

    from sane_hf.downstream.probing import probe_zoo
    from sane_hf.models.sane.modeling_sane import SaneEncoderModel
    from sane_hf.zoo.dataset import load_zoo_dataset

    if args.plot and not args.output_dir:
        raise SystemExit("error: --plot needs --output-dir")
    model = SaneEncoderModel.from_pretrained(args.model).to(_device(args))
    zoo = load_zoo_dataset(args.dataset)
    report = probe_zoo(
        model,
        zoo.splits,
        properties=args.properties,
        baselines=args.baselines,
        max_raw_features=args.max_raw_features,
        include_layer_means=args.layer_means,
        window=args.window,
        halo=args.halo,
        batch_size=args.batch_size,
    )
    print(report.table())
    if args.output_dir:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        report.save_json(output / "probe.json")
        if args.plot:
            report.plot(output / "probe.png")
        print(f"results written to {output}")
    return 0


COMMANDS.append(_add_probe_command)


def _add_sample_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample", help="sample new networks from prompts (KDE over latents) or a Gaussian prior"
    )
    parser.add_argument("--model", required=True, help="SANE checkpoint folder or Hub id")
    parser.add_argument("--dataset", required=True, help="zoo dataset SANE was trained on")
    parser.add_argument(
        "--output-dir", required=True, help="samples/*.safetensors, summary.json, plot"
    )
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument(
        "--num-candidates",
        type=int,
        help="subsampling: draw this many, keep the best --num-samples",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="bootstrapping rounds (with --num-candidates)"
    )
    parser.add_argument(
        "--prior",
        action="store_true",
        help="start from N(0, --prior-sigma) latents instead of prompts",
    )
    parser.add_argument("--prior-sigma", type=float, default=1.0)
    parser.add_argument(
        "--mode",
        choices=("shared", "joint", "token"),
        default="shared",
        help="KDE mode (see sane_hf.downstream.sampling)",
    )
    parser.add_argument(
        "--bandwidth", type=float, default=0.2, help="KDE bandwidth in latent units"
    )
    parser.add_argument("--prompt-dataset", help="zoo dataset of another task to take prompts from")
    parser.add_argument("--prompt-split", default="train")
    parser.add_argument("--num-prompts", type=int, default=30)
    parser.add_argument("--prompt-epoch", type=int, help="default: the last epoch")
    parser.add_argument(
        "--prompt-metric", default="val_acc", help="column ranking prompt candidates"
    )
    parser.add_argument(
        "--architecture-kwargs",
        type=json.loads,
        help="target variant, e.g. '{\"num_classes\": 100}'",
    )
    parser.add_argument(
        "--task-dataset", help="task to score and evaluate on (default: the prompts' zoo task)"
    )
    parser.add_argument(
        "--score-samples", type=int, default=500, help="training samples scoring candidates"
    )
    parser.add_argument(
        "--bn-batches", type=int, default=10, help="batches of 64 for BatchNorm conditioning"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=5,
        help="evaluate after 0..N epochs; -1 skips evaluation",
    )
    parser.add_argument("--seed", type=int, default=0)
    _add_window_arguments(parser)
    parser.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    import torch

    from sane_hf.downstream.evaluation import load_task_dataset
    from sane_hf.downstream.sampling import SaneSampler, select_prompts
    from sane_hf.models.sane.modeling_sane import SaneModel
    from sane_hf.recipes.experiments import zoo_prompts
    from sane_hf.zoo.dataset import load_zoo_dataset

    model = SaneModel.from_pretrained(args.model).to(_device(args)).eval()
    zoo = load_zoo_dataset(args.dataset)
    prompt_zoo = load_zoo_dataset(args.prompt_dataset) if args.prompt_dataset else zoo
    prompt_split = prompt_zoo.splits[args.prompt_split]
    rows = select_prompts(prompt_split, args.num_prompts, args.prompt_epoch, args.prompt_metric)
    hyperparameters = prompt_split[rows[0]]["hyperparameters"]
    sampler = SaneSampler.from_zoo(
        model,
        zoo.metadata,
        architecture_kwargs=args.architecture_kwargs,
        hyperparameters=hyperparameters,
        window=args.window,
        halo=args.halo,
        batch_size=args.batch_size,
    )
    prompts = zoo_prompts(zoo, prompt_zoo, rows, args.prompt_split)
    task = load_task_dataset(prompt_zoo.metadata.zoo, args.task_dataset)
    samples = _draw_samples(args, sampler, prompts, task)

    summary = {"settings": {k: v for k, v in vars(args).items() if k != "func"}}
    _save_samples(samples, args.output_dir)
    if samples.scores is not None:
        summary["scores"] = samples.scores.tolist()
    if torch.equal(sampler.positions, zoo.metadata.layout.positions()):
        from_training_split = prompt_zoo is zoo and args.prompt_split == "train"
        summary["novelty"] = _novelty(sampler, samples, zoo, prompts, rows, from_training_split)
    if args.finetune_epochs >= 0:
        summary["evaluation"] = _evaluate(args, sampler, samples, task, hyperparameters)
    with open(f"{args.output_dir}/summary.json", "w") as file:
        json.dump(summary, file, indent=2)
    print(f"{len(samples)} samples and summary.json written to {args.output_dir}")
    return 0


def _draw_samples(args, sampler, prompts, task):
    """Plain KDE sampling, or subsampling/bootstrapping scored on training data."""
    import torch

    from sane_hf.downstream.evaluation import accuracy_score, random_batches

    norms = [
        m
        for m in sampler.template.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    bn_batches = random_batches(task, args.bn_batches, seed=args.seed) if norms else None
    options = {
        "mode": args.mode,
        "bandwidth": args.bandwidth,
        "generator": torch.Generator().manual_seed(args.seed),
        "bn_batches": bn_batches,
    }
    if args.num_candidates is None and not args.prior:
        return sampler.sample(prompts, args.num_samples, **options)
    return sampler.bootstrap(
        None if args.prior else prompts,
        args.num_samples,
        args.num_candidates or args.num_samples,
        accuracy_score(task, args.score_samples, args.seed),
        args.rounds,
        prior_sigma=args.prior_sigma,
        **options,
    )


def _save_samples(samples, output_dir: str) -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for index, state_dict in enumerate(samples.state_dicts):
        tensors = {key: value.contiguous() for key, value in state_dict.items()}
        save_file(tensors, folder / f"sample_{index:03d}.safetensors")


def _novelty(sampler, samples, zoo, prompts, rows, from_training_split: bool) -> dict:
    """Distances of samples, and of prompts to other models, to the nearest training model."""
    from sane_hf.downstream.sampling import model_groups, novelty_report, split_token_chunks

    train = zoo.splits["train"]
    groups = model_groups(train)
    report = novelty_report(
        samples.tokens,
        split_token_chunks(train),
        sampler.mask,
        sampler.prompt_tokens(prompts),
        prompt_groups=groups[rows] if from_training_split else None,
        reference_groups=groups if from_training_split else None,
    )
    print(report.summary())
    return report.to_dict()


def _evaluate(args, sampler, samples, task, hyperparameters) -> dict:
    """Fine-tune samples and from-scratch networks with the prompts' recipe; table and plot."""
    from sane_hf.downstream.evaluation import evaluate_samples, scratch_models

    init = hyperparameters.get("init") or "default"
    scratch = scratch_models(sampler.template, len(samples), init, args.seed)
    recipe = {
        name: hyperparameters[name]
        for name in ("optimizer", "lr", "weight_decay", "batch_size")
        if hyperparameters.get(name) is not None
    }
    evaluation = evaluate_samples(
        {"SANE": samples.models, "from scratch": scratch},
        task,
        args.finetune_epochs,
        seed=args.seed,
        device=_device(args),
        **recipe,
    )
    print(evaluation.table())
    evaluation.plot(f"{args.output_dir}/evaluation.png")
    return evaluation.to_dict()


COMMANDS.append(_add_sample_command)


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


COMMANDS.append(_add_demo_command)


def _add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a saved SANE model folder or zoo dataset folder to the Hugging Face Hub",
    )
    parser.add_argument("path", help="a save_pretrained folder or a save_zoo_dataset folder")
    parser.add_argument("repo_id", help="Hub repo, e.g. your-name/sane-cnn-mnist")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", help="default: 'Upload ... with sane-hf'")
    parser.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from sane_hf.hub import push_folder

    try:
        commit = push_folder(
            args.path,
            args.repo_id,
            private=args.private or None,
            commit_message=args.commit_message,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {args.path} to {commit.commit_url}")
    return 0


COMMANDS.append(_add_push_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sane-hf", description="SANE weight-space learning")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
