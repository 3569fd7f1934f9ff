"""End-to-end pretraining speed: epochs of ``sane_hf.pretraining.loop.train_sane`` on a zoo dataset
against the pure step time of the same model, optimizer and batch shape.

The end-to-end run is the real training loop: the zoo's tokens on the data device, random
windows, token-level permutations, noise and two views built per batch, host-to-device copies
when the zoo stays on the host (``--data-device cpu``), forward, loss, backward, clipping, AdamW
and the OneCycle schedule. Its step time is read from the loop's own logging intervals after the
first epoch (warm-up and compilation excluded; validation is never in them), and so is its
data-wait fraction (the loop synchronizes on every ``--logging-steps``-th step to measure it).
The pure step repeats the same step on one fixed batch. Target: end-to-end within 10% of pure.

Without ``--dataset`` a raw zoo of randomly initialized networks that drift from epoch to epoch
is written and built into a zoo dataset first (the pipeline's cost does not depend on the weights
being trained; alignment is off, it does not change the pipeline either).

    python -m benchmarks.speed.bench_pretrain_epoch                       # CPU: tiny preset, CNN-m zoo
    python -m benchmarks.speed.bench_pretrain_epoch --preset cnn --models 320 --mixed-precision bf16 \\
        --compile                                                   # GPU
    python -m benchmarks.speed.bench_pretrain_epoch --preset resnet18 --architecture resnet18 \\
        --models 7 --checkpoint-epochs 3 --mixed-precision bf16 --compile

Prints JSON and writes ``benchmarks/results/bench_pretrain_epoch_<preset>[_<tag>].json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks.common import (
    default_device,
    machine_info,
    peak_memory,
    summarize_ms,
    time_repeats,
    write_results,
    write_synthetic_raw_zoo,
)
from benchmarks.speed.bench_embed import ARCHITECTURES
from sane_hf import SaneModel, build_zoo_dataset, save_zoo_dataset
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import (
    create_optimizer,
    load_pretraining_data,
    one_cycle_schedule,
    read_metrics,
    train_sane,
)


def build_synthetic_zoo(work_dir: Path, args: argparse.Namespace) -> Path:
    _, tokensize = ARCHITECTURES[args.architecture]
    kwargs, _ = ARCHITECTURES[args.architecture]
    write_synthetic_raw_zoo(
        work_dir / "raw", args.models, args.checkpoint_epochs, args.architecture, kwargs
    )
    dataset = build_zoo_dataset(work_dir / "raw", tokensize=tokensize, align=False, progress=False)
    save_zoo_dataset(dataset, work_dir / "zoo")
    return work_dir / "zoo"


def end_to_end(config: PretrainingConfig) -> dict[str, float]:
    """Run ``train_sane`` and read its step time and data-wait fraction after the first epoch."""
    summary = train_sane(config)
    intervals = [
        line
        for line in read_metrics(config.output_dir)
        if "steps_per_second" in line and line["epoch"] > 1
    ]
    if not intervals:
        raise ValueError("no logging interval after the first epoch: use more epochs or steps")
    waits = [line["data_wait_fraction"] for line in intervals if "data_wait_fraction" in line]
    return {
        "steps": summary["steps"],
        "steps_per_epoch": summary["steps_per_epoch"],
        "measured_intervals": len(intervals),
        "step_ms": round(
            1e3 / statistics.median(line["steps_per_second"] for line in intervals), 3
        ),
        "data_wait_fraction": round(statistics.mean(waits), 4) if waits else None,
        "final_val_mse": summary.get("val_mse"),
    }


def pure_step_ms(config: PretrainingConfig, steps: int, warmup: int) -> list[float]:
    """Milliseconds of the training loop's step on one fixed batch (no data pipeline)."""
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        dynamo_backend="inductor" if config.torch_compile else None,
    )
    data = load_pretraining_data(config, accelerator)
    batch = data.train.train_batch(epoch=0, index=0).model_inputs()
    model = SaneModel(data.model_config)
    model.set_position_checks(False)  # as in train_sane
    optimizer = create_optimizer(model, config, accelerator.device)
    scheduler = one_cycle_schedule(optimizer, steps + warmup + 1, config.warmup_fraction)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def step() -> None:
        output = model(**batch)
        accelerator.backward(output.loss)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    return time_repeats(step, steps, accelerator.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="SaneConfig preset (tiny, cnn, resnet18)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="cnn_m")
    parser.add_argument("--dataset", help="a zoo dataset folder (default: build a synthetic zoo)")
    parser.add_argument("--models", type=int, default=20, help="models of the synthetic zoo")
    parser.add_argument("--checkpoint-epochs", type=int, default=5, help="checkpoints per model")
    parser.add_argument("--epochs", type=int, default=3, help="pretraining epochs (first: warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--compile", action="store_true", help="torch_compile=True")
    parser.add_argument("--data-device", choices=("auto", "device", "cpu"), default="auto")
    parser.add_argument("--pure-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--tag", help="suffix of the result file name, to keep variants apart")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work_dir:
        start = time.perf_counter()
        dataset = args.dataset or str(build_synthetic_zoo(Path(work_dir), args))
        build_seconds = time.perf_counter() - start
        config = PretrainingConfig(
            dataset=dataset,
            output_dir=str(Path(work_dir) / "run"),
            model={"preset": args.preset},
            batch_size=args.batch_size,
            data_device=args.data_device,
            num_epochs=args.epochs,
            mixed_precision=args.mixed_precision,
            torch_compile=args.compile,
            logging_steps=args.logging_steps,
            report_to="none",
        )
        measured = end_to_end(config)
        pure = summarize_ms(pure_step_ms(config, args.pure_steps, warmup=3))

    device = default_device()
    results = {
        "benchmark": "pretraining epochs end to end vs the pure step",
        "preset": args.preset,
        "dataset": args.dataset or f"synthetic {args.architecture} zoo",
        "models": None if args.dataset else args.models,
        "checkpoints_per_model": None if args.dataset else args.checkpoint_epochs,
        "zoo_build_seconds": None if args.dataset else round(build_seconds, 2),
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "compile": args.compile,
        "data_device": args.data_device,
        "epochs": args.epochs,
        "logging_steps": args.logging_steps,
        "end_to_end": measured,
        "pure_step": pure,
        "end_to_end_over_pure": round(measured["step_ms"] / pure["median_ms"], 3),
        "target_end_to_end_over_pure": 1.1,
        **peak_memory(device),
        **machine_info(device),
    }
    name = f"bench_pretrain_epoch_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    write_results(name, results)


if __name__ == "__main__":
    main()
