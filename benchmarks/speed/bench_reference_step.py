"""Speed of the reference implementation's SANE training step at our ``cpu`` shape.

Why: the CPU step target asks our CPU step (``bench_train_step --preset cpu``) to take at most half the
reference implementation's, "run back to back". The reference's 112 ms of the target was measured
once, by someone else; this script measures it on the machine at hand, so both steps can be
timed one after the other under the same load. The reference's code is not part of this
repository (other owners, other licence): it is imported from a checkout given on the command
line. Setup, offline from a bare mirror of github.com/HSG-AIML/SANE (a clone of it needs no
network), in a venv of its own since its modules import einops, torchmetrics and lightning:

    git clone <mirror dir> /tmp/sane-reference
    python -m venv --system-site-packages /tmp/sane-reference-venv
    /tmp/sane-reference-venv/bin/pip install einops torchmetrics lightning

Side by side in one process (``--ours``): the reference's step and our step variants
(`OUR_VARIANTS`, built as ``bench_train_step`` builds them) are timed in rounds, ``--steps``
steps of each contender in turn with the order turned by one each round, so that a change in the
shared machine's speed reaches all of them alike; each of ours reports its median step and its
ratio to the reference's, round by round and as the median of the rounds (``vs_reference``).
The venv sees our installed package (``--system-site-packages``):

    OMP_NUM_THREADS=1 /tmp/sane-reference-venv/bin/python -m benchmarks.speed.bench_reference_step \
        --reference-dir /tmp/sane-reference \
        --ours fp32 bf16 bf16-compiled bf16-eager-compiled --steps 15 --rounds 6

What is timed is the reference's own ``AEModule.train_step(x_i, m_i, p_i, x_j, m_j, p_j)``, the
call its training loop makes per batch: one ``def_AE.AE`` forward per view, the
``def_loss.GammaContrastReconLoss`` (NT-Xent on the projection head + MSE of the masked
reconstruction, with the R^2 metric it computes every step), backward and its AdamW (lr 1e-4,
weight decay 3e-9 on matrices, 0 on the rest; not fused on CPU). Config: our ``cpu`` shape, the
reference's CNN-CIFAR10 recipe for the block type (``gpt2``) and gamma, its defaults otherwise
(no scheduler, no ``torch.compile``). ``training::precision = "amp"`` only because ``train_step``
calls its GradScaler, which exists only then; on a CPU the scaler and the CUDA autocast disable
themselves, so the step runs in fp32 (checked below).

Same shape, not the same model: the reference runs the two views as two forwards of 32 windows
(ours: one of 64); its projection head flattens the window (48 x 128 -> 30, LayerNorm, ReLU, twice:
185k parameters) where ours pools then maps 128 -> 16; its encoder and decoder have no LayerNorm
before their output layers; its MSE averages over all values of ``mask * output``; 676,509
parameters against our 493,633.

Any pretraining preset's shape (``--preset cpu``: d_model 256, 2+2 blocks, latent 256): its
model section and batch size, the same T=289 tokens, both models built at that shape:

    OMP_NUM_THREADS=1 /tmp/sane-reference-venv/bin/python -m benchmarks.speed.bench_reference_step \
        --reference-dir /tmp/sane-reference --preset cpu --ours fp32 bf16 bf16-compiled

Prints JSON with ``step_median_ms``, ``step_cpu_median_ms`` and ``ours`` and writes
``benchmarks/results/bench_reference_step_cpu.json`` (``..._preset_<name>.json`` with
``--preset``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (
    cpu_op_profile,
    cpu_time_repeats,
    machine_info,
    summarize_ms,
    time_repeats,
    write_results,
)
from benchmarks.speed.bench_train_step import (
    DEFAULT_BATCH_SIZE,
    SEQUENCE_LENGTH,
    autocast_context,
    bench_config,
    compile_model,
    make_train_step,
    model_and_optimizer,
    synthetic_views,
)
from sane_hf import SaneConfig
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.utils.config import load_config


def reference_config(config: SaneConfig, batch_size: int) -> dict:
    """The reference's flat config (``"section::key"``) for our model ``config``'s shape."""
    return {
        # our cpu shape
        "ae:i_dim": config.tokensize,
        "ae:d_model": config.d_model,
        "ae:nhead": config.n_heads,
        "ae:num_layers": config.n_layers,  # encoder and decoder each
        "ae:lat_dim": config.latent_dim,
        "ae:max_positions": list(config.max_positions),
        "ae:dropout": config.dropout,
        "training::windowsize": config.windowsize,
        "trainset::batchsize": batch_size,  # sizes the NT-Xent mask: windows per view
        # the reference's CNN-CIFAR10 recipe (experiments/cnn-cifar10/pretrain_sane_cifar10_cnn.py)
        "ae:transformer_type": "gpt2",
        "training::gamma": config.gamma,
        "training::temperature": config.contrastive_temperature,
        "optim::optimizer": "adamw",
        "optim::lr": 1e-4,
        "optim::wd": 3e-9,
        "training::precision": "amp",  # train_step needs the GradScaler; disabled on a CPU
        "device": "cpu",
    }


# Our step variants timed beside the reference with --ours (bench_train_step's options).
OUR_VARIANTS = {
    "fp32": {"dtype": "fp32", "attn": "sdpa", "compile": "none"},
    "fp32-eager": {"dtype": "fp32", "attn": "eager", "compile": "none"},
    "fp32-compiled": {"dtype": "fp32", "attn": "sdpa", "compile": "model"},
    "bf16": {"dtype": "bf16", "attn": "sdpa", "compile": "none"},
    "bf16-compiled": {"dtype": "bf16", "attn": "sdpa", "compile": "model"},
    "bf16-eager-compiled": {"dtype": "bf16", "attn": "eager", "compile": "model"},
}


def reference_train_step(
    reference_dir: Path, config: SaneConfig, batch: dict, batch_size: int
) -> tuple[Callable[[], torch.Tensor], dict, int]:
    """The reference's ``AEModule.train_step`` on our batch (its two views), its config and its
    parameter count."""
    sys.path.insert(0, str(reference_dir / "src"))
    from SANE.models.def_AE_module import AEModule  # the reference's code, from the checkout

    reference = reference_config(config, batch_size)
    with contextlib.redirect_stdout(sys.stderr):  # its prints; stdout is for the JSON
        module = AEModule(reference)
    if module.scaler.is_enabled():
        raise RuntimeError("the reference's GradScaler is on: this would not be an fp32 step")
    module.model.train()  # what its train_epoch does
    tokens, mask = batch["tokens"].split(batch_size), batch["value_mask"].split(batch_size)
    positions = batch["positions"].to(torch.int).split(batch_size)  # its loop casts to int
    views = (tokens[0], mask[0], positions[0], tokens[1], mask[1], positions[1])

    def train_step() -> torch.Tensor:
        return module.train_step(*views)["loss/loss"].detach()

    return train_step, reference, sum(p.numel() for p in module.model.parameters())


def our_train_step(variant: str, config: SaneConfig, batch: dict) -> Callable[[], torch.Tensor]:
    """Our step in one of `OUR_VARIANTS`, built as ``bench_train_step`` builds it."""
    options = OUR_VARIANTS[variant]
    device = torch.device("cpu")
    # a config of its own: the attention backend is read from the config at every forward, and
    # a shared one would run every variant with the last variant's backend
    model, optimizer = model_and_optimizer(copy.deepcopy(config), device, options["attn"])
    autocast = autocast_context(options["dtype"], device)
    return make_train_step(compile_model(model, options["compile"]), optimizer, batch, autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-dir", required=True, help="checkout of HSG-AIML/SANE")
    parser.add_argument(
        "--ours",
        nargs="*",
        choices=sorted(OUR_VARIANTS),
        default=[],
        help="our step variants to time in the same process, round by round",
    )
    parser.add_argument(
        "--preset",
        help="time this pretraining preset's shape (model section, batch size) instead of the "
        "fixed benchmark shape (d_model 64, 4+4 blocks, batch 32)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all contenders")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--profile", action="store_true", help="also profile 3 steps of each contender by op"
    )
    args = parser.parse_args()

    reference_dir = Path(args.reference_dir).resolve()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.preset:
        pretraining = load_config(PretrainingConfig, args.preset)
        config, batch_size = pretraining.model_config(), pretraining.batch_size
    else:
        config, batch_size = bench_config("cpu"), DEFAULT_BATCH_SIZE["cpu"]
    # our synthetic batch (views stacked on the batch axis), as the reference's two views
    batch = synthetic_views(config, batch_size, config.windowsize, SEQUENCE_LENGTH["cpu"], device)
    reference_step, reference, num_parameters = reference_train_step(
        reference_dir, config, batch, batch_size
    )
    steps = {"reference": reference_step}
    for variant in args.ours:
        steps[variant] = our_train_step(variant, config, batch)
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in steps}
    for name, train_step in steps.items():  # compiles the compiled variants
        for _ in range(args.warmup):
            losses[name].append(train_step())

    # Rounds: each contender's steps in turn, the order turned by one each round, so that a
    # change in the machine's speed reaches all of them alike.
    wall_ms: dict[str, list[float]] = {name: [] for name in steps}
    cpu_ms: dict[str, list[float]] = {name: [] for name in steps}
    round_medians: dict[str, list[float]] = {name: [] for name in steps}
    round_cpu_medians: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            step, kept = steps[name], losses[name]
            times = time_repeats(
                lambda step=step, kept=kept: kept.append(step()), args.steps, device
            )
            wall_ms[name] += times
            cpu_times = cpu_time_repeats(step, args.steps)
            cpu_ms[name] += cpu_times
            round_medians[name].append(statistics.median(times))
            round_cpu_medians[name].append(statistics.median(cpu_times))

    profiles = (
        {name: cpu_op_profile(step, 3) for name, step in steps.items()} if args.profile else {}
    )

    def contender(name: str) -> dict:
        ratios = [ours / ref for ours, ref in zip(round_medians[name], round_medians["reference"])]
        # CPU time: what the step itself used, less moved by other jobs on a shared machine
        cpu_ratios = [
            ours / ref for ours, ref in zip(round_cpu_medians[name], round_cpu_medians["reference"])
        ]
        return {
            **({"options": OUR_VARIANTS[name]} if name in OUR_VARIANTS else {}),
            **{f"step_{key}": value for key, value in summarize_ms(wall_ms[name]).items()},
            **{f"step_cpu_{key}": value for key, value in summarize_ms(cpu_ms[name]).items()},
            "round_median_ms": [round(ms, 1) for ms in round_medians[name]],
            "vs_reference_per_round": [round(ratio, 3) for ratio in ratios],
            "vs_reference": round(statistics.median(ratios), 3),
            "vs_reference_cpu_per_round": [round(ratio, 3) for ratio in cpu_ratios],
            "vs_reference_cpu": round(statistics.median(cpu_ratios), 3),
            "loss_first_last": [
                round(losses[name][0].item(), 4),
                round(losses[name][-1].item(), 4),
            ],
            **profiles.get(name, {}),
        }

    commit = subprocess.run(
        ["git", "-C", str(reference_dir), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    tokens_per_step = 2 * batch_size * config.windowsize
    results = {
        "benchmark": "reference SANE train step (AEModule.train_step: 2 views, loss, backward, AdamW)"
        + (", and ours in the same process, round by round" if args.ours else ""),
        "reference_repository": "github.com/HSG-AIML/SANE",
        "reference_commit": commit or "unknown (not a git checkout)",
        "preset": args.preset or "benchmark shape (cnn-s-cpu model, batch 32)",
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "latent_dim": config.latent_dim,
        "reference_config": reference,
        "dtype": "fp32",
        "batch_size": batch_size,
        "window": config.windowsize,
        "tokensize": config.tokensize,
        "tokens_per_step": tokens_per_step,
        "num_parameters": num_parameters,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        **{
            key: value
            for key, value in contender("reference").items()
            if not key.startswith("vs_reference")
        },
        "tokens_per_s": round(
            tokens_per_step / summarize_ms(wall_ms["reference"])["median_ms"] * 1e3
        ),
        "ours": {name: contender(name) for name in args.ours},
        **machine_info(device),
    }
    write_results(
        "bench_reference_step_" + (f"preset_{args.preset}" if args.preset else "cpu"), results
    )


if __name__ == "__main__":
    main()
