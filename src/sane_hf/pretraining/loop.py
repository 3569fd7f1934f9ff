"""SANE pretraining with Accelerate, laid out like the Hugging Face ``*_no_trainer.py`` examples.

Top to bottom: parse the config, create the Accelerator, load the zoo onto the device, build the
model, the optimizer and the schedule, ``prepare``, resume, train (validating every epoch), save.

Usage::

    sane-hf pretrain --config tiny --dataset ZOO --output-dir OUT --set learning_rate=3e-4
    accelerate launch --multi_gpu --num_processes 8 -m sane_hf pretrain --config cnn ...
    accelerate launch --config_file training/configs/fsdp.yaml -m sane_hf pretrain ...

Configuration: `PretrainingConfig`, loaded like every sane-hf config (`sane_hf.utils.config`):
a preset name (``tiny``, ``cnn``, ``resnet18``) or YAML file, then plain flags (one per field:
``--learning-rate 3e-4``, ``--max-steps 100``), then ``--set key=value`` (dotted keys reach
into ``model``, the ``SaneConfig`` preset and overrides of its fields: ``--set
model.d_model=64``).

Exact resumption: every random choice of a batch (checkpoints, windows, permutations, noise,
erasing) is derived from ``(seed, epoch, batch, rank)``, and a checkpoint keeps model,
optimizer, schedule and the global RNGs (dropout). A run stopped after any checkpoint and
resumed with ``--resume-from-checkpoint latest`` (same config, same number of processes) logs
the same losses as an uninterrupted run. Checkpoint folders hold no pickle: tensors are
safetensors, the rest JSON (``sane_hf.pretraining.checkpointing``). They are written into a
temporary folder and renamed when complete, so ``latest`` never meets a half-written one (an
incomplete folder is skipped with a warning). A resume keeps ``metrics.jsonl`` free of repeated
steps, keeps the original ``pretraining_config.yaml``, and is refused when the training
settings changed (batch size, learning rate, max_steps, ...) unless ``allow_config_change``.

Output folder: ``pretraining_config.yaml``, ``metrics.jsonl`` (training loss terms, learning
rate, steps/s, tokens/s, the fraction of a measured step spent waiting for data; validation MSE
and R^2 every epoch), tracker logs (``sane-pretraining/`` for TensorBoard),
``checkpoint-<step>/``, and at the end the model (``save_pretrained``: weights, config, remote
code, model card), ``sane_zoo.json`` (the zoo's layout and normalization, which embedding and
sampling need) and ``training_summary.json``. The public entry point,
`sane_hf.recipes.pretraining.pretrain`, runs `train_sane`, fits the probe heads and then pushes
(``push_to_hub``) everything in one commit, so a failed upload loses nothing and is retried with
``sane-hf push``.
"""

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import gather_object, set_seed
from datasets import Dataset
from tqdm.auto import tqdm

from sane_hf.hub import save_model_card
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.models.sane.processing_sane import SaneProcessor
from sane_hf.models.sane.processing_universal import SaneUniversalProcessor
from sane_hf.pretraining.augmentation import TokenPermutation, WindowBatch, WindowSampler
from sane_hf.pretraining.checkpointing import CONFIG_FILE as CONFIG_FILE
from sane_hf.pretraining.checkpointing import (
    check_finite_loss,
    full_model_state_dict,
    load_training_state,
    plain_model,
    resolve_checkpoint,
    save_checkpoint,
    save_run_config,
)
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.mixed import mixed_sampler
from sane_hf.pretraining.run_lock import pretraining_run_lock
from sane_hf.weights.alignment import PermutationSpec
from sane_hf.weights.layout import WeightLayout
from sane_hf.zoo.formats import DATASET_METADATA_FILE, apply_umask
from sane_hf.zoo.metadata import ZooMetadata
from sane_hf.zoo.mixed import MixedMetadata, is_mixed_dataset, load_mixed_dataset
from sane_hf.zoo.storage import load_zoo_dataset

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_summary.json"


def build_model_config(
    config: PretrainingConfig, tokensize: int, zoo_dataset: str | None = None
) -> SaneConfig:
    """``SaneConfig`` of the ``model`` section; the token size comes from the zoo, and so does
    ``zoo_dataset`` (its Hub id, for the model card) unless the section sets it."""
    if config.model.tokensize not in (None, tokensize):
        raise ValueError(
            f"model.tokensize={config.model.tokensize} but the zoo's tokens have {tokensize} "
            "values: leave model.tokensize unset"
        )
    defaults = {"zoo_dataset": zoo_dataset, "tokensize": tokensize}
    changes = config.model.changes()
    return config.model_config(**{k: v for k, v in defaults.items() if k not in changes})


def check_positions_fit(model_config: SaneConfig, positions: torch.Tensor) -> None:
    """Fail before training if the zoo's positions exceed the model's position tables."""
    needed = (positions.amax(dim=0) + 1).tolist()
    for name, need, size in zip(("global", "layer", "row"), needed, model_config.max_positions):
        if need > size:
            raise ValueError(
                f"the zoo needs {need} {name} positions but model.max_positions allows {size}: "
                f"set --set model.max_positions=[{', '.join(map(str, needed))}] (or larger)"
            )


def choose_data_device(nbytes: int, device: torch.device, setting: str) -> torch.device:
    """The accelerator when the zoo takes at most a quarter of its memory (or when asked)."""
    if setting == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if setting == "device" or device.type != "cuda":
        return device
    total = torch.cuda.get_device_properties(device).total_memory
    return device if nbytes <= total // 4 else torch.device("cpu")


def create_optimizer(
    model: torch.nn.Module, config: PretrainingConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases). Fused (one kernel for
    all parameters) on CUDA and CPU, where PyTorch has it: on the CPU this replaces the foreach
    update's dozens of small element-wise ops per step."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
        fused=device.type in ("cuda", "cpu"),
    )


def _cosine_anneal(start: float, end: float, fraction: float) -> float:
    """From ``start`` (fraction 0) to ``end`` (fraction 1) along half a cosine, as OneCycleLR."""
    return end + (start - end) / 2 * (math.cos(math.pi * fraction) + 1)


def one_cycle_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's OneCycleLR (cosine, no momentum cycling) as factors of each group's learning rate:
    from 1/25 of it up to the peak at step ``warmup_fraction * total_steps - 1``, then down to
    1/25e4 of it at the last step.

    Why not OneCycleLR itself: it divides by the warm-up length in steps minus one, so a run
    whose warm-up is one step or less (a few steps with the tiny preset) fails with a division
    by zero or starts at the final rate. Here such a run starts at the peak.
    """
    peak = max(warmup_fraction * total_steps - 1, 0.0)
    last = total_steps - 1
    initial, final = 1 / 25, 1 / 25 / 1e4  # OneCycleLR's div_factor and final_div_factor

    def factor(step: int) -> float:
        if step < peak:
            return _cosine_anneal(initial, 1.0, step / peak)
        if last <= peak:  # a one-step run
            return 1.0
        return _cosine_anneal(1.0, final, (step - peak) / (last - peak))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)


class DataWaitMeter:
    """How long steps wait for their batches, measured on chosen steps only.

    A measured step synchronizes the device before and after building each batch, so the wait
    is the real time from the end of the previous work to the batch being ready; unmeasured
    steps keep the device queue running ahead.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.measuring = False
        self.fractions: list[float] = []

    def start_step(self, measure: bool) -> None:
        self.measuring = measure
        if measure:
            synchronize(self.device)
            self.step_start = time.perf_counter()
            self.waited = 0.0

    def batch(self, make_batch: Callable[..., WindowBatch], *args: int) -> WindowBatch:
        """``make_batch(*args)``, timed when the step is measured."""
        if not self.measuring:
            return make_batch(*args)
        synchronize(self.device)
        start = time.perf_counter()
        batch = make_batch(*args)
        synchronize(self.device)
        self.waited += time.perf_counter() - start
        return batch

    def end_step(self) -> float | None:
        """The fraction of the measured step spent waiting for data, else None."""
        if not self.measuring:
            return None
        synchronize(self.device)
        fraction = self.waited / (time.perf_counter() - self.step_start)
        self.fractions.append(fraction)
        return fraction


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, sampler: WindowSampler, accelerator: Accelerator
) -> dict[str, float]:
    """Reconstruction MSE and R^2 over the real values of every validation window (clean).

    Each process scores its share of the windows (the same number of forward passes on every
    process, as FSDP requires); sums are reduced across processes, so the result is the same
    for any number of processes.
    """
    model.eval()
    # squared error, number of real values, their sum, their sum of squares
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for batch in sampler.eval_batches(accelerator.process_index, accelerator.num_processes):
        with accelerator.autocast():
            reconstructions = model(**batch.model_inputs()).reconstructions
        targets, mask = batch.targets[0].double(), batch.token_mask
        error = (reconstructions.double() - targets).square()
        sums += torch.stack(
            [error[mask].sum(), mask.sum(), targets[mask].sum(), targets[mask].square().sum()]
        )
    squared_error, count, total, total_squares = accelerator.reduce(sums, "sum").tolist()
    model.train()
    variance_sum = total_squares - total**2 / count
    return {"val_mse": squared_error / count, "val_r2": 1 - squared_error / variance_sum}


class MetricsLog:
    """Metrics to the Accelerate trackers and, from the main process, to ``metrics.jsonl``.

    A run starting at ``start_step`` first drops the lines of later steps (logged by a run that
    was killed after its last checkpoint), so a resumed run's file has every step once.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str, start_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        if accelerator.is_main_process and self.path.is_file():
            kept = [line for line in _metric_lines(self.path) if line["step"] <= start_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The lines of a run's ``metrics.jsonl`` (a resumed run continues it)."""
    return _metric_lines(Path(output_dir) / METRICS_FILE)


def _metric_lines(path: Path) -> list[dict[str, float]]:
    """The complete lines of a metrics file (a kill may have cut the last one)."""
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            logger.warning(f"{path}: skipping a cut line {text[:40]!r}")
    return lines


def _tracker_config(config: PretrainingConfig) -> dict[str, Any]:
    """Flat scalar config for trackers (TensorBoard's hparams take no lists or dicts)."""
    plain = config.to_dict()
    values = {f"model.{k}": v for k, v in plain["model"].items()}
    values.update({k: v for k, v in plain.items() if k != "model"})
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}


@dataclass
class PretrainingData:
    """The zoo, ready to train on: window samplers and what the model and the save need."""

    train: WindowSampler
    validation: WindowSampler | None
    model_config: SaneConfig
    metadata: ZooMetadata | MixedMetadata


def split_tokens(split: Dataset, layout: WeightLayout) -> torch.Tensor:
    """All tokens of a zoo split as one ``[checkpoints, tokens, tokensize]`` tensor, in their
    storage dtype (float16 zoos stay float16)."""
    storage = np.dtype(split.features["tokens"].dtype)  # the numpy format would give float32
    tokens = torch.from_numpy(
        split.with_format("numpy", columns=["tokens"], dtype=storage)[:]["tokens"]
    )
    expected = (layout.num_tokens, layout.tokensize)
    if tuple(tokens.shape[1:]) != expected:
        raise ValueError(
            f"the split's tokens are {tuple(tokens.shape[1:])} per checkpoint but the zoo's "
            f"layout describes {expected}"
        )
    return tokens


def load_mixed_pretraining_data(
    config: PretrainingConfig, accelerator: Accelerator
) -> PretrainingData:
    """A mixed zoo (`sane_hf.zoo.mixed`): universal tokens of several architectures, relative
    positions; the model records the token scheme it reads."""
    mixed = load_mixed_dataset(config.dataset)
    if "train" not in mixed.splits:
        raise ValueError(f"{config.dataset} has no train split (splits: {list(mixed.splits)})")
    scheme = mixed.metadata.scheme
    model_config = build_model_config(config, scheme.tokensize)
    if model_config.position_scheme != "relative" or model_config.token_scheme not in (
        None,
        scheme.to_dict(),
    ):
        raise ValueError(
            "a mixed zoo needs model.position_scheme=relative (the multi-cpu preset) and its own "
            f"token scheme {scheme.to_dict()}, got {model_config.position_scheme!r}, "
            f"{model_config.token_scheme}"
        )
    model_config.token_scheme = scheme.to_dict()
    for split in mixed.splits.values():
        positions = torch.from_numpy(np.concatenate(split.with_format("numpy")["positions"]))
        check_positions_fit(model_config, positions.long())

    def sampler(split_name: str) -> WindowSampler:
        return mixed_sampler(
            mixed.splits[split_name],
            config,
            model_config.windowsize,
            accelerator.device,
            config.seed,
        )

    validation = sampler("validation") if len(mixed.splits.get("validation", [])) else None
    return PretrainingData(sampler("train"), validation, model_config, mixed.metadata)


def load_pretraining_data(config: PretrainingConfig, accelerator: Accelerator) -> PretrainingData:
    """Load the zoo, put its tokens on the data device and build the window samplers."""
    if is_mixed_dataset(config.dataset):
        return load_mixed_pretraining_data(config, accelerator)
    splits, metadata = load_zoo_dataset(config.dataset)
    if "train" not in splits:
        raise ValueError(f"{config.dataset} has no train split (splits: {list(splits)})")
    layout = metadata.layout
    hub_id = None if Path(config.dataset).exists() else config.dataset
    model_config = build_model_config(config, layout.tokensize, zoo_dataset=hub_id)
    positions, counts = layout.positions(), layout.row_counts()
    check_positions_fit(model_config, positions)
    permutation = None
    if config.permutation:
        spec = PermutationSpec.from_model(metadata.build_model())
        permutation = TokenPermutation.from_spec(spec, layout)

    def sampler(split_name: str, seed: int) -> WindowSampler:
        tokens = split_tokens(splits[split_name], layout)
        nbytes = tokens.numel() * tokens.element_size()
        data_device = choose_data_device(nbytes, accelerator.device, config.data_device)
        return WindowSampler(
            tokens.to(data_device),
            counts,
            positions,
            window_size=model_config.windowsize,
            batch_size=config.batch_size,
            device=accelerator.device,
            permutation=permutation,
            noise_sigma=config.noise_sigma,
            erase_probability=config.erase_probability,
            seed=seed,
            epoch_size=config.epoch_size,
        )

    validation = sampler("validation", config.seed) if len(splits.get("validation", [])) else None
    return PretrainingData(sampler("train", config.seed), validation, model_config, metadata)


def train_sane(config: PretrainingConfig) -> dict[str, Any]:
    """The Accelerate training run of ``config``: saves model, processor and summary (returned,
    also in ``output_dir/training_summary.json``). The public entry point is
    `sane_hf.recipes.pretraining.pretrain`, which adds the probe heads and the push. One run per
    ``output_dir`` at a time (`pretraining_run_lock`): a second is refused with `ZooBusyError`."""
    if config.dataset is None:
        raise ValueError("no dataset: set `dataset` (--dataset PATH) to a zoo dataset folder")
    with pretraining_run_lock(config):
        return _train_sane(config)


def _train_sane(config: PretrainingConfig) -> dict[str, Any]:
    # Accelerator: devices, processes, mixed precision, accumulation, trackers, compilation.
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        dynamo_backend="inductor" if config.torch_compile else None,
    )
    logger.info(accelerator.state, main_process_only=False)
    set_seed(config.seed)  # the model's initialization; batches have their own seeds
    checkpoint = resolve_checkpoint(config) if config.resume_from_checkpoint else None
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    save_run_config(config, checkpoint, write=accelerator.is_main_process)

    # Data: the zoo's tokens on the device, windows and views built there.
    data = load_pretraining_data(config, accelerator)
    train_sampler = data.train

    # Model. The zoo's positions were checked against its tables once (check_positions_fit):
    # no per-forward range check, which would synchronize with the device twice a step.
    model = SaneModel(data.model_config)
    model.set_position_checks(False)

    # Optimizer and OneCycle schedule (in optimizer steps).
    optimizer = create_optimizer(model, config, accelerator.device)
    batches_per_epoch = train_sampler.batches_per_epoch(accelerator.num_processes)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    scheduler = one_cycle_schedule(optimizer, total_steps, config.warmup_fraction)

    # Prepare. The schedule is stepped by hand once per optimizer step (a prepared one steps
    # num_processes times), so it is not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume: model, optimizer, schedule and global RNGs; batches follow from the step.
    start_step = 0
    if checkpoint is not None:
        counters = load_training_state(checkpoint, accelerator, model, optimizer, scheduler)
        start_step = counters["step"]
        logger.info(f"resumed from {checkpoint} at step {start_step}")

    accelerator.init_trackers("sane-pretraining", config=_tracker_config(config))
    metrics_log = MetricsLog(accelerator, config.output_dir, start_step)
    tokens_per_step = (
        2 * config.batch_size * train_sampler.window_size * accumulation * accelerator.num_processes
    )
    logger.info(
        f"{train_sampler.num_checkpoints} training checkpoints of {train_sampler.num_tokens} "
        f"tokens, {steps_per_epoch} steps per epoch, {total_steps} steps, "
        f"{tokens_per_step} tokens per step"
    )

    # Train.
    data_wait = DataWaitMeter(accelerator.device)
    running = torch.zeros(3, device=accelerator.device)  # loss, reconstruction, contrastive
    eval_metrics: dict[str, float] = {}
    steps_per_second = []
    progress = tqdm(
        total=total_steps, initial=start_step, disable=not accelerator.is_local_main_process
    )
    model.train()
    interval_start, interval_steps = time.perf_counter(), 0
    completed, batch = start_step, None
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        data_wait.start_step(measure=(step + 1) % config.logging_steps == 0)
        for micro_step in range(accumulation):
            batch = data_wait.batch(
                train_sampler.train_batch,
                epoch,
                step_in_epoch * accumulation + micro_step,
                accelerator.process_index,
                accelerator.num_processes,
            )
            with accelerator.accumulate(model):
                output = model(**batch.model_inputs())
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += (
                torch.stack(
                    [output.loss, output.reconstruction_loss, output.contrastive_loss]
                ).detach()
                / accumulation
            )
        wait_fraction = data_wait.end_step()
        progress.update(1)
        interval_steps += 1

        completed = step + 1
        log_now = completed % config.logging_steps == 0 or completed == total_steps
        if log_now or (config.checkpointing_steps and completed % config.checkpointing_steps == 0):
            check_finite_loss(accelerator, running, completed, config.output_dir)
        if log_now:
            loss, reconstruction, contrastive = (
                accelerator.reduce(running, "mean") / interval_steps
            ).tolist()
            elapsed = time.perf_counter() - interval_start
            steps_per_second.append(interval_steps / elapsed)
            metrics = {
                "loss": loss,
                "reconstruction_loss": reconstruction,
                "contrastive_loss": contrastive,
                "learning_rate": scheduler.get_last_lr()[0],
                "epoch": completed / steps_per_epoch,
                "steps_per_second": interval_steps / elapsed,
                "tokens_per_second": interval_steps * tokens_per_step / elapsed,
            }
            if wait_fraction is not None:
                metrics["data_wait_fraction"] = wait_fraction
            metrics_log.log(metrics, step=completed)
            progress.set_postfix(loss=f"{loss:.4f}")
            running.zero_()
            interval_start, interval_steps = time.perf_counter(), 0

        # Evaluation and checkpointing are not training time: the throughput interval skips them.
        pause_start = time.perf_counter()
        if data.validation is not None and (
            completed % steps_per_epoch == 0 or completed == total_steps
        ):
            eval_metrics = evaluate(model, data.validation, accelerator)
            metrics_log.log({**eval_metrics, "epoch": completed / steps_per_epoch}, step=completed)
        if config.checkpointing_steps and completed % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, config, model, optimizer, scheduler, completed)
        interval_start += time.perf_counter() - pause_start

        if completed == config.stop_at_step:
            logger.info(f"stop_at_step={completed}: ending the run without a final save")
            break
    progress.close()

    # Save the model, the zoo description it needs downstream, and the run summary.
    summary = {
        "steps": completed,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "steps_per_second": float(np.mean(steps_per_second)) if steps_per_second else None,
        "data_wait_fraction": float(np.mean(data_wait.fractions)) if data_wait.fractions else None,
        **eval_metrics,
        "processes": replica_report(accelerator, model, batch),
    }
    accelerator.wait_for_everyone()
    finished = completed == total_steps
    if finished:
        save_model(accelerator, model, data, config, eval_metrics)
    if accelerator.is_main_process:
        with open(Path(config.output_dir) / SUMMARY_FILE, "w") as file:
            json.dump(summary, file, indent=1)
    accelerator.end_training()
    # Accelerate keeps mixed precision and accumulation settings in process-wide singletons;
    # forget them so that another run in this process (a notebook, a test) may change them.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return summary


def replica_report(
    accelerator: Accelerator, model: torch.nn.Module, batch: WindowBatch | None
) -> list[dict[str, float | None]]:
    """Per process: the parameter norm (equal on all data-parallel replicas when gradients are
    synchronized) and a checksum of its last batch (different: each process sees its own data)."""
    parameter_norm = torch.stack(
        [p.detach().double().square().sum() for p in plain_model(accelerator, model).parameters()]
    ).sum()
    report = {
        "rank": accelerator.process_index,
        "parameter_norm": parameter_norm.sqrt().item(),
        "batch_checksum": None if batch is None else batch.views.double().sum().item(),
    }
    return gather_object([report])


def save_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: PretrainingData,
    config: PretrainingConfig,
    eval_metrics: dict[str, float],
) -> None:
    """``save_pretrained`` (weights, config, model card) plus the `SaneProcessor` (layout,
    training-split statistics, alignment reference: ``SaneProcessor.from_pretrained(output_dir)``
    prepares a user's networks like the zoo) and ``sane_zoo.json``, which sampling needs.
    `sane_hf.recipes.pretraining.push_run` uploads them later, with the config and the logs (the Hub shows TensorBoard logs
    as training metrics). Probe heads are fitted above this layer, by the callers that have a
    zoo at hand (``sane-hf pretrain``, the recipes)."""
    unwrapped = plain_model(accelerator, model)
    card_metrics = eval_metrics if unwrapped.config.zoo_dataset and eval_metrics else None
    unwrapped.save_pretrained(
        config.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=full_model_state_dict(accelerator, model),
    )
    if not accelerator.is_main_process:
        return
    for weights in Path(config.output_dir).glob("*.safetensors"):
        apply_umask(weights)  # safetensors writes 0600 files
    save_model_card(unwrapped, config.output_dir, metrics=card_metrics, repo_id=config.hub_model_id)
    if isinstance(data.metadata, MixedMetadata):  # nothing fitted on the zoos travels along
        SaneUniversalProcessor(
            data.metadata.scheme, unwrapped.config.max_positions
        ).save_pretrained(config.output_dir)
        return
    (Path(config.output_dir) / DATASET_METADATA_FILE).write_text(data.metadata.to_json())
    SaneProcessor.from_zoo(config.dataset, config=unwrapped.config).save_pretrained(
        config.output_dir
    )
