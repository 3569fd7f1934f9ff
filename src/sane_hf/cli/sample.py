"""`sane-hf sample`: new networks from a pretrained SANE."""

from __future__ import annotations

import json

from sane_hf.cli.common import add_window_arguments, device_argument

_COMMANDS: list = []


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
    add_window_arguments(parser)
    parser.set_defaults(func=_run_sample)


def _run_sample(args) -> int:
    import torch

    from sane_hf.downstream.evaluation import load_task_dataset
    from sane_hf.downstream.sampling import SaneSampler, select_prompts
    from sane_hf.models.sane.modeling_sane import SaneModel
    from sane_hf.recipes.experiments import zoo_prompts
    from sane_hf.zoo.dataset import load_zoo_dataset

    model = SaneModel.from_pretrained(args.model).to(device_argument(args)).eval()
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
        baselines = None
        if "novelty" in summary and not args.prior:
            baselines = _baselines(args, sampler, zoo, prompts, task)
        summary["evaluation"] = _evaluate(args, sampler, samples, task, hyperparameters, baselines)
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
    from sane_hf.downstream.novelty import model_groups, novelty_report, split_token_chunks

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


def _baselines(args, sampler, zoo, prompts, task):
    """Noise and ensemble baselines around the prompts (sane_hf.downstream.baselines)."""
    import torch

    from sane_hf.downstream.baselines import MemorizationBaselines
    from sane_hf.downstream.evaluation import random_batches
    from sane_hf.downstream.novelty import split_token_chunks

    norms = any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in sampler.template.modules()
    )
    return MemorizationBaselines(
        sampler,
        sampler.prompt_tokens(prompts),
        lambda: split_token_chunks(zoo.splits["train"]),
        num_networks=args.num_samples,
        seed=args.seed,
        bn_batches=random_batches(task, args.bn_batches, seed=args.seed) if norms else None,
    )


def _evaluate(args, sampler, samples, task, hyperparameters, baselines=None) -> dict:
    """Fine-tune samples, from-scratch networks and the memorization baselines with the
    prompts' recipe; table and plots."""
    from sane_hf.downstream.evaluation import evaluate_samples, scratch_models

    init = hyperparameters.get("init") or "default"
    scratch = scratch_models(sampler.template, len(samples), init, args.seed)
    recipe = {
        name: hyperparameters[name]
        for name in ("optimizer", "lr", "weight_decay", "batch_size")
        if hyperparameters.get(name) is not None
    }
    evaluation = evaluate_samples(
        {"SANE": samples, "from scratch": scratch},
        task,
        args.finetune_epochs,
        seed=args.seed,
        device=device_argument(args),
        baselines=baselines,
        **recipe,
    )
    print(evaluation.table())
    evaluation.plot(f"{args.output_dir}/evaluation.png")
    if evaluation.novelty:
        evaluation.plot_novelty(f"{args.output_dir}/novelty.png")
    return evaluation.to_dict()


_COMMANDS.append(_add_sample_command)


def register(subparsers) -> None:
    """Add this module's commands to the `sane-hf` parser."""
    for add_command in _COMMANDS:
        add_command(subparsers)
