"""Speed of the reference implementation's SANE training step at our ``cpu`` shape.

Why: issue 14 asks our CPU step (``bench_train_step --preset cpu``) to take at most half the
reference implementation's, "run back to back". The reference's 112 ms in the issue was measured
once, by someone else; this script measures it on the machine at hand, so both steps can be
timed one after the other under the same load. The reference's code is not part of this
repository (other owners, other licence): it is imported from a checkout given on the command
line. Setup, offline from a bare mirror of github.com/HSG-AIML/SANE (a clone of it needs no
network), in a venv of its own since its modules import einops, torchmetrics and lightning:

    git clone <mirror dir> /tmp/sane-reference
    python -m venv --system-site-packages /tmp/sane-reference-venv
    /tmp/sane-reference-venv/bin/pip install einops torchmetrics lightning

Back to back (both fp32, one thread, our synthetic batch of ``bench_train_step``):

    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_train_step --preset cpu --threads 1
    OMP_NUM_THREADS=1 /tmp/sane-reference-venv/bin/python -m benchmarks.speed.bench_reference_step \
        --reference-dir /tmp/sane-reference

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

Prints JSON with ``step_median_ms`` and ``step_cpu_median_ms`` and writes
``benchmarks/results/bench_reference_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    cpu_time_repeats,
    machine_info,
    summarize_ms,
    time_repeats,
    write_results,
)
from benchmarks.speed.bench_train_step import (
    DEFAULT_BATCH_SIZE,
    SEQUENCE_LENGTH,
    bench_config,
    synthetic_views,
)
from sane_hf import SaneConfig


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-dir", required=True, help="checkout of HSG-AIML/SANE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()

    reference_dir = Path(args.reference_dir).resolve()
    sys.path.insert(0, str(reference_dir / "src"))
    from SANE.models.def_AE_module import AEModule  # the reference's code, from the checkout

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config = bench_config("cpu")
    batch_size = DEFAULT_BATCH_SIZE["cpu"]
    reference = reference_config(config, batch_size)
    with contextlib.redirect_stdout(sys.stderr):  # its prints; stdout is for the JSON
        module = AEModule(reference)
    if module.scaler.is_enabled():
        raise RuntimeError("the reference's GradScaler is on: this would not be an fp32 step")
    module.model.train()  # what its train_epoch does

    # our synthetic batch (views stacked on the batch axis), as the reference's two views
    batch = synthetic_views(config, batch_size, config.windowsize, SEQUENCE_LENGTH["cpu"], device)
    tokens, mask = batch["tokens"].split(batch_size), batch["value_mask"].split(batch_size)
    positions = batch["positions"].to(torch.int).split(batch_size)  # its loop casts to int
    views = (tokens[0], mask[0], positions[0], tokens[1], mask[1], positions[1])
    losses = []

    def train_step() -> None:
        losses.append(module.train_step(*views)["loss/loss"].detach())

    for _ in range(args.warmup):
        train_step()
    step_ms = time_repeats(train_step, args.steps, device)
    cpu_step_ms = cpu_time_repeats(train_step, args.steps)

    commit = subprocess.run(
        ["git", "-C", str(reference_dir), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    tokens_per_step = 2 * batch_size * config.windowsize
    results = {
        "benchmark": "reference SANE train step (AEModule.train_step: 2 views, loss, backward, AdamW)",
        "reference_repository": "github.com/HSG-AIML/SANE",
        "reference_commit": commit or "unknown (not a git checkout)",
        "reference_config": reference,
        "dtype": "fp32",
        "batch_size": batch_size,
        "window": config.windowsize,
        "tokensize": config.tokensize,
        "tokens_per_step": tokens_per_step,
        "num_parameters": sum(p.numel() for p in module.model.parameters()),
        "steps": args.steps,
        **{f"step_{key}": value for key, value in summarize_ms(step_ms).items()},
        **{f"step_cpu_{key}": value for key, value in summarize_ms(cpu_step_ms).items()},
        "tokens_per_s": round(tokens_per_step / summarize_ms(step_ms)["median_ms"] * 1e3),
        "loss_first_last": [round(losses[0].item(), 4), round(losses[-1].item(), 4)],
        **machine_info(device),
    }
    write_results("bench_reference_step_cpu", results)


if __name__ == "__main__":
    main()
