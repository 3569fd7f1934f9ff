"""What the benchmarks share: device facts, timing without host syncs, result files, and for
the reproduction scripts the ``--scale`` switch, the SANE recipes per scale, work folders and
markdown tables.

Speed benchmarks (``python -m benchmarks.speed.bench_x``) print one JSON object and keep their
latest result in ``benchmarks/results/<name>.json``; reproduction scripts
(``python -m benchmarks.reproduce.x``) run the resumable stages of
`sane_hf.recipes.experiments` in ``outputs/reproduce/<experiment>-<scale>/`` and write
``benchmarks/results/reproduce_<experiment>_<scale>.json``. Both record the device, the command
line and the load average (a shared CPU's timings carry how busy it was).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from filelock import FileLock

import sane_hf
from sane_hf import build_model
from sane_hf.utils.config import add_overrides_argument, load_values
from sane_hf.zoo.formats import (
    atomic_write_text,
    write_checkpoint,
    write_zoo_info,
    write_zoo_metadata,
)

RESULTS_DIR = Path(__file__).parent / "results"
WORK_ROOT = Path(__file__).parent.parent / "outputs" / "reproduce"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints), else the platform's processor name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, the process' peak RSS on CPU."""
    if device.type == "cuda":
        gib, kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    else:  # ru_maxrss is in KiB on Linux
        gib, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS"
    return {"peak_memory_gib": round(gib, 3), "peak_memory_kind": kind}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device, software versions, how the benchmark was started and how busy the CPU was."""
    return {
        "device": device_name(device),
        "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other processes competing for the CPU make CPU timings noisy: record how many there were
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def write_results(name: str, results: dict[str, Any]) -> None:
    """Print ``results`` as JSON and keep them in ``benchmarks/results/<name>.json``."""
    text = json.dumps(results, indent=2)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(text + "\n")


def update_results_file(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and rewrite a results JSON shared by parallel runs (one zoo each), under a
    file lock so that no run's entry is lost, and atomically so that no reader sees half a file."""
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(WORK_ROOT / f"{path.name}.lock"):
        data = json.loads(path.read_text()) if path.is_file() else {}
        change(data)
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def summarize_ms(times_ms: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(times_ms), 3),
        "min_ms": round(min(times_ms), 3),
        "max_ms": round(max(times_ms), 3),
    }


def time_repeats(function: Callable[[], Any], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` back-to-back calls of ``function``.

    On CUDA the calls are timed with events between them and the host synchronizes once at the
    end, so the host can run ahead exactly as in a training loop: a step that waits for the host
    (launch overhead, a hidden synchronization) shows up as a longer step. On CPU, wall clock.
    """
    if device.type != "cuda":
        return _clocked_calls(function, repeats, time.perf_counter)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    synchronize(device)
    events[0].record()
    for event in events[1:]:
        function()
        event.record()
    synchronize(device)
    return [start.elapsed_time(end) for start, end in itertools.pairwise(events)]


def cpu_time_repeats(function: Callable[[], Any], repeats: int) -> list[float]:
    """CPU milliseconds this process spent in each of ``repeats`` calls of ``function``.

    On a shared CPU the wall clock of a one-thread benchmark grows with the load (other
    processes take turns on the cores); the process' CPU time does much less, so CPU timings are
    compared on it, next to the wall-clock numbers and the load average.
    """
    return _clocked_calls(function, repeats, time.process_time)


def _clocked_calls(
    function: Callable[[], Any], repeats: int, clock: Callable[[], float]
) -> list[float]:
    """Milliseconds of ``clock`` (wall or CPU seconds) each of ``repeats`` calls took."""
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append((clock() - start) * 1e3)
    return times


# Kernel name patterns of each category of a GPU profile (first match wins).
KERNEL_CATEGORIES = {
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "matmul", "wgmma"),
    "optimizer": ("adam", "multi_tensor"),
    "copy": ("memcpy", "memset", "copy"),
}


def by_category(
    times_ms: dict[str, float], categories: dict[str, tuple[str, ...]], rest: str
) -> dict[str, float]:
    """Sum ``{name: ms}`` into the first category one of whose keys is in the (lower-cased)
    name, the others into ``rest``."""
    totals = dict.fromkeys([*categories, rest], 0.0)
    for name, ms in times_ms.items():
        lowered = name.lower()
        category = next(
            (c for c, keys in categories.items() if any(k in lowered for k in keys)), rest
        )
        totals[category] += ms
    return totals


def kernel_profile(function: Callable[[], Any], repeats: int, device: torch.device) -> dict:
    """Where the GPU time of ``function`` goes: kernel time per category, the GPU-busy fraction
    of the wall time, and the top kernels (profiled over ``repeats`` calls; CUDA only)."""
    if device.type != "cuda":
        return {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(repeats):
            function()
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / repeats
    kernels: dict[str, float] = {}
    launches = 0
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            elapsed_ms = event.time_range.elapsed_us() / 1e3
            kernels[event.name] = kernels.get(event.name, 0.0) + elapsed_ms / repeats
            launches += 1
    categories = by_category(kernels, KERNEL_CATEGORIES, "other (elementwise, norms, fused)")
    busy_ms = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda item: -item[1])[:8]
    return {
        "profile_wall_ms_per_call": round(wall_ms, 2),
        "profile_kernel_ms_per_call": round(busy_ms, 2),
        "profile_gpu_busy_fraction": round(busy_ms / wall_ms, 3),
        "profile_kernel_ms_by_category": {c: round(ms, 2) for c, ms in categories.items()},
        "profile_kernels_launched_per_call": launches // repeats,
        "profile_top_kernels_ms": {name[:90]: round(ms, 3) for name, ms in top},
    }


# CPU op categories of `cpu_op_profile`: the first whose key is in an aten op's name wins.
CPU_OP_CATEGORIES = {
    "attention": ("scaled_dot_product", "flash_attention", "_softmax", "softmax"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "GELU": ("gelu",),
    "LayerNorm": ("layer_norm",),
    "AdamW": ("adam",),
    "copies and casts": ("copy_", "_to_copy", "clone", "aten::cat", "contiguous"),
    "compiled kernels": ("graph_", "cpp_fused", "torch-compiled", "compiledfunction"),
}


def cpu_op_profile(function: Callable[[], Any], repeats: int) -> dict:
    """Where the CPU time of ``function`` goes: the self time of its ops per category
    (`CPU_OP_CATEGORIES`, the rest as "other"), per call, and the top ops (``repeats`` calls)."""
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(repeats):
            function()
    wall_ms = (time.perf_counter() - start) * 1e3 / repeats
    ops = {e.key: e.self_cpu_time_total / 1e3 / repeats for e in profile.key_averages()}
    categories = by_category(ops, CPU_OP_CATEGORIES, "other")
    top = sorted(ops.items(), key=lambda item: -item[1])[:12]
    return {
        "profile_wall_ms_per_call": round(wall_ms, 1),
        "profile_self_ms_by_category": {c: round(ms, 1) for c, ms in categories.items()},
        "profile_top_ops_ms": {name[:80]: round(ms, 2) for name, ms in top},
    }


def timed_seconds(function: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``function()`` and the wall-clock seconds until its device work is done."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def write_synthetic_raw_zoo(
    root: Path,
    num_models: int,
    num_epochs: int,
    architecture: str = "cnn_s",
    architecture_kwargs: dict[str, Any] | None = None,
    activation: str = "relu",
) -> None:
    """A raw zoo directory of randomly initialized networks drifting a little every epoch.

    Benchmarks of the dataset builder and of pretraining need a zoo of the right shapes, not a
    trained one; this writes one in seconds (model ``m`` seeded with ``m``).
    """
    kwargs = architecture_kwargs or {}
    zoo = {"architecture": architecture, "architecture_kwargs": kwargs, "dataset": "synthetic"}
    write_zoo_info(root, zoo | {"epochs": list(range(num_epochs))})
    lines = []
    for model in range(num_models):
        torch.manual_seed(model)
        state_dict = build_model(architecture, **kwargs).state_dict()
        for epoch in range(num_epochs):
            state_dict = {
                key: value + 0.01 * torch.randn_like(value) if value.is_floating_point() else value
                for key, value in state_dict.items()
            }
            file = write_checkpoint(root, f"model_{model:04d}", epoch, state_dict)
            accuracy = 0.1 + 0.8 * epoch / num_epochs
            lines.append(
                {"file": file, "model_id": f"model_{model:04d}", "epoch": epoch, "seed": model,
                 "train_loss": 1.0, "train_acc": accuracy, "val_loss": None, "val_acc": None,
                 "test_loss": 1.0, "test_acc": accuracy, "ggap": 0.0,
                 "hyperparameters": {"activation": activation, "dropout": 0.0}}
            )  # fmt: skip
    write_zoo_metadata(root, lines)


# ----------------------------------------------------------------------------------------------
# Reproduction scripts

# The pretraining recipes are presets (sane_hf/presets/pretraining); the scripts take their
# values as plain dicts (``{**CPU_PRETRAINING, "num_epochs": 150}``) and add run plumbing.
# GPU scale for CNN-s zoos: the `cnn` preset (the reference's recipe, sane-method.md Sec. 3:
# AdamW 1e-4, wd 3e-9, OneCycle, 50 epochs, bf16).
GPU_PRETRAINING: dict[str, Any] = {
    **load_values("cnn", "pretraining"),
    "checkpointing_steps": 2000,
    "checkpoints_total_limit": 1,
    "report_to": "none",
}
# CPU scale for CNN-s zoos: the `cnn-s-cpu` preset (tiny widened to d_model 64 and 4+4 blocks,
# the paper's latent size 128, a 48-token window: a whole CNN-s network).
CPU_PRETRAINING: dict[str, Any] = load_values("cnn-s-cpu", "pretraining")


def experiment_spec(experiment: str, scale: str, overrides: Sequence[str] = ()):
    """The `ExperimentSpec` preset ``<experiment>-<scale>`` (``sane_hf/presets/experiment/``)
    with ``key=value`` overrides (``--set``)."""
    from sane_hf.recipes.experiments import ExperimentSpec

    return ExperimentSpec.load(f"{experiment}-{scale}", overrides=overrides)


def parse_args(description: str, scales: Sequence[str] = ("cpu", "gpu")) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--scale",
        choices=scales,
        default="cpu",
        help="cpu: what a 2-core CPU does in minutes; gpu: the full scale (one H100)"
        + (
            "; smoke: every stage at toy size, to check a machine in a minute"
            if "smoke" in scales
            else ""
        ),
    )
    parser.add_argument("--work-dir", help="zoos, datasets and models (default outputs/reproduce/)")
    add_overrides_argument(parser)  # changes to the experiment's spec: --set zoo.num_models=20
    return parser.parse_args()


def _module_name() -> str:
    """``benchmarks.reproduce.x`` of the running script (run as ``python -m``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def work_dir(args: argparse.Namespace, experiment: str) -> Path:
    path = Path(args.work_dir) if args.work_dir else WORK_ROOT / f"{experiment}-{args.scale}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def result_path(experiment: str, scale: str, suffix: str) -> Path:
    """``benchmarks/results/reproduce_<experiment>_<scale><suffix>``, e.g. ``_probe.png``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    return RESULTS_DIR / f"reproduce_{experiment}_{scale}{suffix}"


def write_experiment_results(experiment: str, scale: str, results: dict[str, Any]) -> Path:
    """Write a reproduction's results JSON (with command and machine) and say where it went."""
    path = result_path(experiment, scale, ".json")
    command = shlex.join(["python", "-m", _module_name(), *sys.argv[1:]])
    payload = {"experiment": experiment, "scale": scale, "command": command, **results}
    payload["machine"] = {**machine_info(default_device()), "sane_hf": sane_hf.__version__}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nresults written to {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Markdown tables of the results (RESULTS.md and the released model card)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def probe_markdown(report: dict[str, Any]) -> str:
    """Properties x feature sets of a `ProbeReport.to_dict()`: R^2, or accuracy for categories."""
    scores: dict[str, dict[str, str]] = {}
    for result in report["results"]:
        metric = "R²" if result["metric"] == "r2" else "accuracy"
        cell = scores.setdefault(f"{result['property']} ({metric})", {})
        cell[result["features"]] = f"{result['score']:.3f}"
    features = list(dict.fromkeys(r["features"] for r in report["results"]))
    rows = [[name, *(cells.get(f, "-") for f in features)] for name, cells in scores.items()]
    return markdown_table(["property", *features], rows)


def sampling_markdown(results: dict[str, Any], epochs: list[int]) -> str:
    """Groups x fine-tuning epochs, accuracy % mean ± std, with n and the median novelty:
    distance to the nearest training checkpoint relative to the distance between prompts, and
    mistake IoU (each SANE row is followed by its matched-noise row)."""
    from sane_hf.downstream.evaluation import SampleEvaluation

    evaluation = SampleEvaluation.from_dict(results["evaluation"])
    columns = [evaluation.epochs.index(epoch) for epoch in epochs]
    rows = []
    for group, accuracy in evaluation.accuracy.items():
        values = 100 * np.array(accuracy)
        cells = [f"{values[:, c].mean():.1f} ± {values[:, c].std():.1f}" for c in columns]
        medians = evaluation.novelty_medians(group) or {}
        relative = medians.get("relative", results["novelty"].get(group, {}).get("relative"))
        iou = medians.get("iou")
        rows.append(
            [
                group,
                len(values),
                *cells,
                "-" if relative is None else f"{relative:.2f}",
                "-" if iou is None else f"{iou:.2f}",
            ]
        )
    header = ["method", "n", *(f"epoch {epoch}" for epoch in epochs), "novelty", "mistake IoU"]
    return markdown_table(header, rows)
