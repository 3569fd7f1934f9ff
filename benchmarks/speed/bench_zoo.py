"""Benchmark zoo training: vectorized ``train_zoo`` against training the same models one by one.

Presets:

- ``cpu`` (default): 100-model CNN-s seed zoo on digits (28x28), 10 epochs, batch 10, a
  checkpoint every epoch. Target: <= 2 minutes wall-clock on a 2-core CPU.
- ``h100``: the paper-scale 1,000-model CNN-s seed zoo on the MNIST subset, 50 epochs, on CUDA.

Baseline: ``--baseline-models`` of the zoo's models trained with a plain PyTorch loop (one
model, ``torch.optim.Adam``, the same batches, the same checkpoint evaluations), extrapolated
linearly to the whole zoo. On CPU the loop runs single-threaded (small models train fastest that
way) and the extrapolation assumes one such process per core, the best one can do without
vectorizing. CPU seconds (all threads) are reported too: on a machine shared with other jobs
they are a steadier measure than wall-clock time. Prints JSON and writes
``benchmarks/results/bench_zoo.json``::

    python -m benchmarks.speed.bench_zoo                   # CPU target
    python -m benchmarks.speed.bench_zoo --bf16            # bf16 autocast (AMX on recent Xeons)
    python -m benchmarks.speed.bench_zoo --preset h100     # on a GPU machine

``--zoo-dir DIR`` keeps the trained zoo in ``DIR`` (a new folder) instead of a temporary one: the
GPU-scale MNIST reproduction (``reproduce_mnist.py --scale gpu``, same zoo config) then starts
from it instead of training the zoo again.

``--processes N`` measures scaling out instead: the preset's zoo trained by ``sane-hf zoo train``
in one process and under ``torchrun --standalone --nproc_per_node N`` (one thread per process
on CPU, one GPU per process on CUDA), wall-clock time of each, the speed-up, and whether the two
zoos' ``metadata.jsonl`` are identical. Writes ``benchmarks/results/bench_zoo_processes.json``::

    OMP_NUM_THREADS=1 python -m benchmarks.speed.bench_zoo --processes 2
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning threads of two
# processes starve each other and a step slows down 3-5x. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sane_hf import ZooConfig, train_zoo
from sane_hf.zoo.population import data_order, initialize_zoo_model
from sane_hf.zoo.tasks import load_dataset_by_name

PRESETS = {
    "cpu": ZooConfig(
        architecture="cnn_s",
        dataset="digits",
        num_models=100,
        epochs=10,
        batch_size=10,
        models_per_chunk=50,
        device="cpu",
    ),
    "h100": ZooConfig(
        architecture="cnn_s",
        dataset="mnist",
        num_models=1000,
        epochs=50,
        batch_size=10,
        models_per_chunk=1000,
        device="cuda",
    ),
}


def plain_loop_seconds(config: ZooConfig, zoo_dir: Path, num_models: int) -> tuple[float, float]:
    """Wall and CPU seconds to train and evaluate ``num_models`` zoo models one at a time."""
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    dataset = load_dataset_by_name(config.dataset, zoo["input_shape"], **config.dataset_kwargs)
    dataset = dataset.to(config.device)
    x, y = dataset.train
    start, cpu_start = time.perf_counter(), time.process_time()
    for spec in config.model_specs()[:num_models]:
        hp = spec.hyperparameters
        model = initialize_zoo_model(config.architecture, zoo["architecture_kwargs"], hp, spec.seed)
        model = model.to(config.device)
        optimizer = torch.optim.Adam(model.parameters(), hp["lr"], weight_decay=hp["weight_decay"])
        evaluate(model, dataset)
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = torch.from_numpy(data_order(spec.seed, epoch, len(y))).to(config.device)
            for batch in order.split(config.batch_size):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
            if epoch in config.resolved_checkpoint_epochs:
                evaluate(model, dataset)
    _synchronize(config.device)
    return time.perf_counter() - start, time.process_time() - cpu_start


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset) -> list[float]:
    model.eval()
    metrics = []
    for x, y in dataset.splits().values():
        logits = model(x)
        metrics += [
            F.cross_entropy(logits, y).item(),
            (logits.argmax(1) == y).float().mean().item(),
        ]
    return metrics


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _config(args: argparse.Namespace) -> ZooConfig:
    values = PRESETS[args.preset].to_dict()
    for name in ("num_models", "epochs", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["bf16"] = args.bf16
    return ZooConfig.from_dict(values)


def train_with_processes(config: ZooConfig, zoo_dir: Path, processes: int) -> float:
    """Wall seconds of ``sane-hf zoo train`` of ``config`` with ``processes`` processes (torchrun,
    as in tests/test_zoo_distributed.py, for more than one)."""
    config_file = zoo_dir.parent / f"{zoo_dir.name}.json"
    config_file.write_text(json.dumps(config.to_dict()))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launcher, "-m", "sane_hf", "zoo", "train", "--output", str(zoo_dir)]
    command += ["--config", str(config_file), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    return time.perf_counter() - start


def scale_out(config: ZooConfig, processes: int) -> dict:
    """1-process vs ``processes``-process wall time of the same zoo."""
    work_dir = Path(tempfile.mkdtemp(prefix="bench_zoo_processes_"))
    try:
        load_before = os.getloadavg()
        one = train_with_processes(config, work_dir / "one", 1)
        many = train_with_processes(config, work_dir / f"p{processes}", processes)
        load_after = os.getloadavg()
        same = (work_dir / "one" / "metadata.jsonl").read_bytes() == (
            work_dir / f"p{processes}" / "metadata.jsonl"
        ).read_bytes()
    finally:
        shutil.rmtree(work_dir)
    return {
        "benchmark": "zoo_processes",
        "config": config.to_dict(),
        "device": config.device,
        "cpu_count": os.cpu_count(),
        "threads_per_process": 1,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "processes": processes,
        "one_process_seconds": round(one, 2),
        f"{processes}_process_seconds": round(many, 2),
        "speedup": round(one / many, 2),
        "target_speedup": 1.8 if processes == 2 else None,
        "identical_metadata": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--num-models", type=int, help="override the preset's zoo size")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--baseline-models", type=int, default=3, help="models in the plain loop")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--output", default="benchmarks/results/bench_zoo.json")
    parser.add_argument("--zoo-dir", help="keep the zoo in this new folder (default: temporary)")
    parser.add_argument(
        "--processes", type=int, help="time 1 process vs N processes (torchrun) instead"
    )
    args = parser.parse_args()
    config = _config(args)
    if args.processes:
        output = Path(args.output.replace("bench_zoo.json", "bench_zoo_processes.json"))
        result = scale_out(config, args.processes)
        print(json.dumps(result, indent=2))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        return
    on_gpu = config.device.startswith("cuda")

    if args.zoo_dir and Path(args.zoo_dir).exists() and any(Path(args.zoo_dir).iterdir()):
        parser.error(f"--zoo-dir {args.zoo_dir} is not empty: the benchmark times a fresh zoo")
    zoo_dir = Path(args.zoo_dir or tempfile.mkdtemp(prefix="bench_zoo_"))
    try:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        start, cpu_start = time.perf_counter(), time.process_time()
        # the glibc heap setting is opt-in: the benchmark measures the tuned CPU path
        train_zoo(config, zoo_dir, progress=True, keep_freed_memory=True)
        _synchronize(config.device)
        zoo_seconds, zoo_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        lines = (zoo_dir / "metadata.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        final = torch.tensor([r["test_acc"] for r in records if r["epoch"] == config.epochs])
        threads = torch.get_num_threads()
        torch.set_num_threads(threads if on_gpu else 1)
        baseline, baseline_cpu = plain_loop_seconds(config, zoo_dir, args.baseline_models)
        torch.set_num_threads(threads)
    finally:
        if not args.zoo_dir:
            shutil.rmtree(zoo_dir)

    workers = 1 if on_gpu else os.cpu_count()
    per_model = config.num_models / args.baseline_models
    plain_seconds = baseline * per_model / workers
    result = {
        "preset": args.preset,
        "config": config.to_dict(),
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch_threads": threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "zoo_seconds": round(zoo_seconds, 2),
        "zoo_cpu_seconds": round(zoo_cpu_seconds, 2),
        "target_seconds": 120 if args.preset == "cpu" else None,
        "models_x_epochs_per_second": round(config.num_models * config.epochs / zoo_seconds, 2),
        "checkpoints": len(records),
        "plain_loop_models_timed": args.baseline_models,
        "plain_loop_parallel_processes": workers,
        "plain_loop_extrapolated_seconds": round(plain_seconds, 1),
        "plain_loop_extrapolated_cpu_seconds": round(baseline_cpu * per_model, 1),
        "speedup_vs_plain_loop": round(plain_seconds / zoo_seconds, 2),
        "cpu_time_ratio_vs_plain_loop": round(baseline_cpu * per_model / zoo_cpu_seconds, 2),
        "final_epoch_test_acc_mean": round(final.mean().item(), 4),
        "final_epoch_test_acc_std": round(final.std().item(), 4),
        "final_epoch_test_acc_min": round(final.min().item(), 4),
    }
    if on_gpu:
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=2))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
