"""The GPU runs of sane-hf, each made to fit one 10-minute call of a GPU machine.

    python -m benchmarks.gpu_run benchmarks     # every GPU speed benchmark, in priority order
    python -m benchmarks.gpu_run reproduction   # the GPU-scale MNIST reproduction; rerun until
                                                # it prints "reproduction finished"
    python -m benchmarks.gpu_run benchmarks --dry-run --output-dir /tmp/dry

Run them through ``scripts/gpu/run_gpu_benchmarks.sh`` and ``run_gpu_reproduction.sh``, which
first set up the packages a GPU image may lack (``scripts/gpu/gpu_env.sh``).

Each step runs in its own process with its own time limit; one that fails or runs out of time
is recorded and the next one runs. ``BUDGET_S`` (environment; default 540 s for the benchmarks,
560 s for the reproduction) bounds the whole run: a step is skipped when less time is left than
it needs. The status of every step goes to ``benchmarks/results/gpu_run.json`` (the
reproduction's to ``gpu_reproduction_run.json``), the log to ``OUTPUT_DIR/<run>.log`` and the
result files this run wrote to ``OUTPUT_DIR/<run>.tgz`` (unpack it in the repository root).
``OUTPUT_DIR`` is ``--output-dir``, else ``$OUT``, else /tmp.

``--dry-run`` goes through every step on the CPU in seconds: tiny shapes (the ``DRY_RUN``
arguments replace each step's sizes; compilation and CUDA graphs are left out), ``--device
cpu``, all steps in this one process (a fresh Python per step would spend most of the time
importing torch), results in ``OUTPUT_DIR/dry-run/`` instead of ``benchmarks/results/``. The
scripts put a stand-in ``nvidia-smi`` on the PATH for it (``scripts/gpu/dry_run/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import benchmarks.common

ROOT = Path(__file__).parent.parent
GPU_WORK = Path("outputs/reproduce/mnist-gpu")


@dataclass
class Step:
    """One benchmark run: ``python -m benchmarks.<module> ARGS`` within ``limit_s`` seconds,
    started only when at least ``needs_s`` seconds of the budget are left."""

    name: str
    limit_s: int
    needs_s: int
    module: str
    args: list[str] = field(default_factory=list)


def step(name: str, limit_s: int, needs_s: int, module: str, args: str = "") -> Step:
    return Step(name, limit_s, needs_s, module, args.split())


BENCHMARKS = [
    # Train step (targets: cnn <= 20 ms and 5.0 GiB, resnet18 <= 150 ms and 32.8 GiB).
    step("step_cnn_eager", 60, 20, "speed.bench_train_step", "--preset cnn --tag eager"),
    step(
        "step_cnn_compile_graph",
        150,
        60,
        "speed.bench_train_step",
        "--preset cnn --compile model --cuda-graph --tag compile_graph",
    ),
    step(
        "step_resnet18_compile",
        150,
        60,
        "speed.bench_train_step",
        "--preset resnet18 --compile model --tag compile",
    ),
    # Sampling 100 ResNet-18 from 10 prompts (target <= 10 s) and embedding 100 ResNet-18.
    step(
        "sample_resnet18",
        150,
        50,
        "speed.bench_sample",
        "--preset resnet18 --architecture resnet18 --num-prompts 10 --num-samples 100 --tag gpu",
    ),
    step(
        "embed_resnet18",
        120,
        45,
        "speed.bench_embed",
        "--preset resnet18 --architecture resnet18 --num-models 100 --tag gpu",
    ),
    # End to end: pretraining epochs vs the pure step (target: within 10%).
    step(
        "epoch_cnn",
        150,
        60,
        "speed.bench_pretrain_epoch",
        "--preset cnn --architecture cnn_m --models 240 --checkpoint-epochs 10 --epochs 2 "
        "--mixed-precision bf16 --compile",
    ),
    step("step_resnet18_eager", 90, 30, "speed.bench_train_step", "--preset resnet18 --tag eager"),
    step(
        "epoch_resnet18",
        150,
        70,
        "speed.bench_pretrain_epoch",
        "--preset resnet18 --architecture resnet18 --models 7 --checkpoint-epochs 3 --epochs 2 "
        "--mixed-precision bf16",
    ),
    # The data pipeline alone, as time allows: zoo on the GPU, and in host memory (pinned copies).
    step("data_cnn", 60, 20, "speed.bench_pretraining_data", "--preset cnn"),
    step(
        "data_resnet18_host",
        90,
        40,
        "speed.bench_pretraining_data",
        "--preset resnet18 --data-device cpu --tag host",
    ),
    # Variants, as time allows.
    step(
        "step_cnn_compile",
        120,
        40,
        "speed.bench_train_step",
        "--preset cnn --compile model --tag compile",
    ),
    step(
        "sample_resnet18_short_halo",
        120,
        40,
        "speed.bench_sample",
        "--preset resnet18 --architecture resnet18 --num-prompts 10 --num-samples 100 "
        "--window 224 --halo 16 --tag gpu_short_halo",
    ),
]

# --dry-run: per module, the flags that are left out (GPU only, or minutes of compilation on a
# CPU) and the tiny sizes that are appended (argparse keeps the last value of a flag).
DRY_RUN = {
    "speed.bench_train_step": (
        ["--cuda-graph"],
        "--preset tiny --compile none --steps 1 --warmup 0 --device cpu",
    ),
    "speed.bench_sample": (
        [],
        "--preset tiny --architecture cnn_s --num-prompts 2 --num-samples 2 --device cpu",
    ),
    "speed.bench_embed": (
        [],
        "--preset tiny --architecture cnn_s --num-models 2 --distinct 1 --device cpu",
    ),
    "speed.bench_pretrain_epoch": (
        ["--compile"],
        "--preset tiny --architecture cnn_s --models 7 --checkpoint-epochs 1 --epochs 2 "
        "--pure-steps 2 --mixed-precision no",
    ),
    "speed.bench_pretraining_data": ([], "--preset tiny --checkpoints 2 --batches 2 --device cpu"),
    "speed.bench_zoo": ([], "--num-models 12 --epochs 2 --device cpu"),
    "reproduce.mnist": ([], "--scale smoke"),
}


def dry_run_args(module: str, args: list[str]) -> list[str]:
    dropped, tiny = DRY_RUN[module]
    kept = [arg for arg in args if arg not in dropped]
    if "--window" in kept:  # a decoding window for the tiny preset's networks
        kept += ["--window", "8", "--halo", "2"]
    return kept + tiny.split()


class Runner:
    """Runs steps within the budget, keeps their statuses, their log and their result files."""

    def __init__(self, run: str, budget_s: float, output_dir: Path, dry_run: bool):
        self.run, self.budget_s, self.dry_run = run, budget_s, dry_run
        self.start = time.monotonic()
        self.start_wall = time.time()
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        self.log = output_dir / f"{run}.log"
        self.log.write_text("")
        self.statuses: dict[str, str] = {}
        if dry_run:  # every result file of the steps lands here, away from the committed ones
            self.results_dir = output_dir / "dry-run" / "results"
            shutil.rmtree(self.results_dir.parent, ignore_errors=True)
            self.results_dir.mkdir(parents=True)
            benchmarks.common.RESULTS_DIR = self.results_dir
        else:
            self.results_dir = benchmarks.common.RESULTS_DIR
        self.device = self.query_device()  # first, so that a machine without a GPU shows at once

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def say(self, line: str) -> None:
        print(line, flush=True)
        with open(self.log, "a") as log:
            log.write(line + "\n")

    def step(self, step: Step) -> str:
        """Run ``step`` unless too little time is left; returns and records its status."""
        left = self.left_s()
        if left < step.needs_s:
            status = "skipped"
        else:
            limit = min(step.limit_s, int(left))
            self.say(f"=== {step.name} (limit {limit}s, {int(left)}s left)")
            began = time.monotonic()
            status = self._in_process(step) if self.dry_run else self._subprocess(step, limit)
            status += f" after {time.monotonic() - began:.0f}s"
        self.say(f"--- {step.name}: {status}")
        self.statuses[step.name] = status
        return status

    def _subprocess(self, step: Step, limit: int) -> str:
        command = [sys.executable, "-m", f"benchmarks.{step.module}", *step.args]
        with open(self.log, "a") as log:
            try:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            except subprocess.TimeoutExpired:
                return "timeout"
        return "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"

    def _in_process(self, step: Step) -> str:
        args = dry_run_args(step.module, step.args)
        saved_argv = sys.argv
        sys.argv = [f"benchmarks/{step.module.replace('.', '/')}.py", *args]
        with (
            open(self.log, "a") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            try:
                runpy.run_module(f"benchmarks.{step.module}", run_name="__main__", alter_sys=True)
            except SystemExit as error:  # argparse errors
                if error.code not in (0, None):
                    return f"failed (exit {error.code})"
            except Exception as error:
                print(f"{type(error).__name__}: {error}", file=log)
                return f"failed ({type(error).__name__})"
            finally:
                sys.argv = saved_argv
        return "ok"

    def query_device(self) -> str:
        """The GPU's name, memory and driver (nvidia-smi), also in the log."""
        query = [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ]
        try:
            line = subprocess.run(query, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            self.say(f"nvidia-smi: {error}")
            return "unknown (no nvidia-smi)"
        self.say(line.stdout.strip() or f"nvidia-smi failed: {line.stderr.strip()}")
        return line.stdout.split(",")[0].strip() or "unknown (nvidia-smi failed)"

    def finish(self, summary_name: str, extra: dict | None = None) -> Path:
        """Write the summary of statuses and pack it with this run's result files."""
        summary = {
            "seconds": round(time.monotonic() - self.start),
            "budget_s": self.budget_s,
            "device": self.device,
            "dry_run": self.dry_run,
            "steps": self.statuses,
            **(extra or {}),
        }
        path = self.results_dir / summary_name
        path.write_text(json.dumps(summary, indent=1) + "\n")
        self.say(json.dumps(summary, indent=1))
        return path

    def pack(self, files: list[Path], tarball: str) -> Path:
        """``files`` (those that exist) into ``OUTPUT_DIR/<tarball>``, named as in the
        repository (``benchmarks/results/...``), so that it unpacks in the repository root."""
        path = self.output_dir / tarball
        with tarfile.open(path, "w:gz") as tar:
            for file in sorted(set(files)):
                if file.is_file():
                    tar.add(file, arcname=self.repository_name(file))
        self.say(f"packed {path}")
        return path

    def repository_name(self, file: Path) -> str:
        """Where ``file`` belongs in the repository (dry-run files as if they were real)."""
        if file.is_relative_to(self.results_dir):
            return str(Path("benchmarks/results") / file.relative_to(self.results_dir))
        if self.dry_run:
            return str(GPU_WORK / file.relative_to(self.output_dir / "dry-run" / "work"))
        return str(file.resolve().relative_to(ROOT.resolve()))

    def new_results(self) -> list[Path]:
        """Result files written since this run started."""
        return [p for p in self.results_dir.glob("*.json") if p.stat().st_mtime >= self.start_wall]


def run_benchmarks(runner: Runner) -> None:
    for each in BENCHMARKS:
        runner.step(each)
    summary = runner.finish("gpu_run.json")
    runner.pack([*runner.new_results(), summary], "gpu_results.tgz")


def run_reproduction(runner: Runner) -> None:
    """The 1,000-model CNN-s zoo timed by `bench_zoo.py --preset h100` (BENCHMARKS.md's H100
    number) into the reproduction's zoo folder, then `reproduce/mnist.py --scale gpu` (dataset,
    SANE pretraining with a checkpoint every 1,500 steps, probes, sampling), which resumes where
    the previous call stopped."""
    work = (runner.output_dir / "dry-run" / "work") if runner.dry_run else ROOT / GPU_WORK
    work.mkdir(parents=True, exist_ok=True)
    zoo_result = runner.results_dir / "bench_zoo_h100.json"
    if not (work / "zoo").exists():
        zoo_args = f"--preset h100 --baseline-models 1 --zoo-dir {work / 'zoo'} --output "
        runner.step(step("zoo", 10_000, 0, "speed.bench_zoo", zoo_args + str(zoo_result)))
    left = int(runner.left_s())
    finished = False
    if left > 30:
        status = runner.step(
            step("reproduction", left, 30, "reproduce.mnist", f"--scale gpu --work-dir {work}")
        )
        finished = status.startswith("ok")
        if finished:
            runner.say("reproduction finished")
    summary = runner.finish("gpu_reproduction_run.json", {"finished": finished})
    scale = "smoke" if runner.dry_run else "gpu"  # the scale the dry run's arguments choose
    files = [zoo_result, summary, *runner.results_dir.glob(f"reproduce_mnist_{scale}*")]
    files += [*work.glob("*.json"), *work.glob("sane/*.json"), *work.glob("sane/*.yaml")]
    runner.pack(files, "reproduce_mnist_gpu.tgz")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=("benchmarks", "reproduction"))
    parser.add_argument("--dry-run", action="store_true", help="every step, tiny, on the CPU")
    parser.add_argument("--output-dir", help="log and tarball (default: $OUT, else /tmp)")
    args = parser.parse_args(argv)
    default_budget = 540 if args.run == "benchmarks" else 560
    output_dir = Path(args.output_dir or os.environ.get("OUT") or "/tmp")
    budget = float(os.environ.get("BUDGET_S", default_budget))
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # a log line per 30 s, not per step
    runner = Runner(args.run, budget, output_dir, args.dry_run)
    (run_benchmarks if args.run == "benchmarks" else run_reproduction)(runner)


if __name__ == "__main__":
    main()
