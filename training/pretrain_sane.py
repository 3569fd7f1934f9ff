#!/usr/bin/env python
"""Pretrain SANE on a model zoo with Accelerate, without a Trainer.

Laid out like transformers' ``examples/pytorch/*/run_*_no_trainer.py`` and built only from
sane-hf's public pieces: parse the arguments, create the Accelerator, load the zoo (windows,
augmented views), build the model, the optimizer and the schedule, ``prepare``, resume, train
(validating every epoch, checkpointing every ``--checkpointing_steps``), save model, processor
and probe heads, push them in one commit.

It trains exactly like ``sane-hf pretrain`` (the same seed gives the same losses; a test checks
it), so change either with its twin in mind: ``sane_hf.pretraining.loop.pretrain``.

    accelerate launch training/pretrain_sane.py --dataset_name ZOO --config tiny \\
        --output_dir outputs/sane-tiny --max_train_steps 200
    accelerate launch --config_file training/configs/multi_gpu.yaml training/pretrain_sane.py \\
        --dataset_name ZOO --config cnn --output_dir outputs/sane-cnn --mixed_precision bf16

``--config`` is a pretraining preset (``tiny``, ``cnn``, ``resnet18``) or a YAML file (see
``training/configs/``); the flags below override it, then ``--set key=value`` reaches every
other field (``--set model.d_model=64``, ``--set noise_sigma=0.05``).
"""

import argparse
import json
import logging
import math
import os
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sane_hf import SaneModel
from sane_hf.pretraining.checkpointing import (
    check_finite_loss,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
    save_run_config,
)
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import (
    SUMMARY_FILE,
    MetricsLog,
    create_optimizer,
    evaluate,
    load_pretraining_data,
    one_cycle_schedule,
    save_model,
)
from sane_hf.pretraining.run_lock import pretraining_run_lock
from sane_hf.recipes.pretraining import finish_run
from sane_hf.utils.config import add_source_arguments
from sane_hf.utils.sources import missing_local_path

logger = get_logger(__name__)

# transformers' flag names -> the `PretrainingConfig` fields they set.
FLAG_FIELDS = {
    "dataset_name": "dataset",
    "output_dir": "output_dir",
    "seed": "seed",
    "per_device_train_batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "num_train_epochs": "num_epochs",
    "max_train_steps": "max_steps",
    "warmup_ratio": "warmup_fraction",
    "max_grad_norm": "max_grad_norm",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "mixed_precision": "mixed_precision",
    "checkpointing_steps": "checkpointing_steps",
    "checkpoints_total_limit": "checkpoints_total_limit",
    "resume_from_checkpoint": "resume_from_checkpoint",
    "logging_steps": "logging_steps",
    "report_to": "report_to",
    "push_to_hub": "push_to_hub",
    "hub_model_id": "hub_model_id",
}


def parse_args(argv: list[str] | None = None) -> PretrainingConfig:
    parser = argparse.ArgumentParser(description="Pretrain SANE on a zoo dataset with Accelerate.")
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="a zoo dataset: a folder written by `sane-hf zoo build`, or its Hub id",
    )
    # --config (a pretraining preset or YAML file, default tiny) and --set KEY=VALUE (any other
    # PretrainingConfig field, applied last: --set model.d_model=64), as in `sane-hf pretrain`.
    add_source_arguments(parser, PretrainingConfig.CONFIG_KIND, "PretrainingConfig")
    parser.set_defaults(config="tiny")
    parser.add_argument("--output_dir", help="checkpoints, logs and the final model")
    parser.add_argument("--seed", type=int, help="model initialization and every batch's draws")
    parser.add_argument("--per_device_train_batch_size", type=int, help="windows per micro-batch")
    parser.add_argument("--learning_rate", type=float, help="peak of the OneCycle schedule")
    parser.add_argument("--weight_decay", type=float, help="AdamW weight decay (matrices only)")
    parser.add_argument("--num_train_epochs", type=int)
    parser.add_argument("--max_train_steps", type=int, help="optimizer steps; wins over epochs")
    parser.add_argument("--warmup_ratio", type=float, help="fraction of the steps warming up")
    parser.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    parser.add_argument("--gradient_accumulation_steps", type=int)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"])
    parser.add_argument("--checkpointing_steps", type=int, help="save the state every N steps")
    parser.add_argument("--checkpoints_total_limit", type=int, help="keep the newest N only")
    parser.add_argument(
        "--resume_from_checkpoint", help="a checkpoint-<step> folder, or `latest` in output_dir"
    )
    parser.add_argument("--logging_steps", type=int, help="log the losses every N steps")
    parser.add_argument("--report_to", help="tensorboard, wandb, ..., all or none")
    parser.add_argument("--push_to_hub", action="store_true", default=None)
    parser.add_argument("--hub_model_id", help="the Hub repo to push to")
    args = parser.parse_args(argv)
    if problem := missing_local_path(args.dataset_name):  # before any Hub request for it
        parser.error(f"--dataset_name {args.dataset_name}: {problem}")
    flags = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()}
    return PretrainingConfig.load(
        args.config, {k: v for k, v in flags.items() if v is not None}, args.overrides
    )


def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    # One run per output folder: a second one (or a resume while this runs) is refused at once.
    with pretraining_run_lock(config):
        return train(config)


def train(config: PretrainingConfig) -> dict:

    # The Accelerator handles devices, processes, mixed precision, accumulation and trackers;
    # `accelerate launch` (training/configs/) says how many processes and machines.
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
        dynamo_backend="inductor" if config.torch_compile else None,
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()

    # The seed fixes the model's initialization; every batch derives its own draws (windows,
    # permutations, noise) from (seed, epoch, batch, rank), so a resumed run sees the same data.
    set_seed(config.seed)
    checkpoint = resolve_checkpoint(config) if config.resume_from_checkpoint else None
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    save_run_config(config, checkpoint, write=accelerator.is_main_process)

    # Data: the zoo's tokens on the device; `WindowSampler`s cut windows and augment views there.
    data = load_pretraining_data(config, accelerator)
    train_sampler = data.train

    # Model: the zoo's positions were checked against its tables while loading, so no
    # per-forward range check.
    model = SaneModel(data.model_config)
    model.set_position_checks(False)

    # Optimizer (AdamW, no decay on norms and biases) and OneCycle schedule in optimizer steps.
    optimizer = create_optimizer(model, config, accelerator.device)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(
        train_sampler.batches_per_epoch(accelerator.num_processes) / accumulation
    )
    max_train_steps = config.max_steps or config.num_epochs * steps_per_epoch
    lr_scheduler = one_cycle_schedule(optimizer, max_train_steps, config.warmup_fraction)

    # Prepare everything with the accelerator. The schedule steps once per optimizer step by
    # hand (a prepared one would step once per process), so it is not prepared.
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume model, optimizer, schedule and RNGs; the batches follow from the step.
    starting_step = 0
    if checkpoint is not None:
        starting_step = load_training_state(
            checkpoint, accelerator, model, optimizer, lr_scheduler
        )["step"]
        accelerator.print(f"Resumed from checkpoint: {checkpoint} at step {starting_step}")

    # Trackers take flat scalars (TensorBoard's hparams take no lists or dicts).
    tracker_config = {
        k: v if isinstance(v, int | float | str | bool) else str(v)
        for k, v in config.to_dict().items()
    }
    accelerator.init_trackers("sane-pretraining", config=tracker_config)
    metrics_log = MetricsLog(accelerator, config.output_dir, starting_step)

    # Train!
    total_batch_size = config.batch_size * accelerator.num_processes * accumulation
    logger.info("***** Running training *****")
    logger.info(f"  Num training checkpoints = {train_sampler.num_checkpoints}")
    logger.info(f"  Steps per epoch = {steps_per_epoch}")
    logger.info(f"  Total train batch size (w. parallel & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    progress_bar = tqdm(
        total=max_train_steps,
        initial=starting_step,
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    # Loss terms summed over the steps since the last log: total, reconstruction, contrastive.
    running = torch.zeros(3, device=accelerator.device)
    eval_metrics: dict[str, float] = {}
    completed_steps, steps_since_log = starting_step, 0
    for step in range(starting_step, max_train_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        for micro_step in range(accumulation):
            batch = train_sampler.train_batch(
                epoch,
                step_in_epoch * accumulation + micro_step,
                accelerator.process_index,
                accelerator.num_processes,
            )
            with accelerator.accumulate(model):
                outputs = model(**batch.model_inputs())
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses = [outputs.loss, outputs.reconstruction_loss, outputs.contrastive_loss]
            running += torch.stack(losses).detach() / accumulation
        progress_bar.update(1)
        completed_steps, steps_since_log = step + 1, steps_since_log + 1

        # Stop at a NaN/Inf loss before it is logged or saved in a checkpoint.
        log_now = completed_steps % config.logging_steps == 0 or completed_steps == max_train_steps
        checkpoint_now = (
            config.checkpointing_steps and completed_steps % config.checkpointing_steps == 0
        )
        if log_now or checkpoint_now:
            check_finite_loss(accelerator, running, completed_steps, config.output_dir)
        if log_now:
            loss, reconstruction, contrastive = (
                accelerator.reduce(running, "mean") / steps_since_log
            ).tolist()
            metrics = {
                "loss": loss,
                "reconstruction_loss": reconstruction,
                "contrastive_loss": contrastive,
                "learning_rate": lr_scheduler.get_last_lr()[0],
                "epoch": completed_steps / steps_per_epoch,
            }
            metrics_log.log(metrics, step=completed_steps)
            progress_bar.set_postfix(loss=f"{loss:.4f}")
            running.zero_()
            steps_since_log = 0

        # Validation (reconstruction MSE and R^2 of clean windows) at the end of every epoch.
        if data.validation is not None and (
            completed_steps % steps_per_epoch == 0 or completed_steps == max_train_steps
        ):
            eval_metrics = evaluate(model, data.validation, accelerator)
            logger.info(f"epoch {completed_steps / steps_per_epoch:g}: {eval_metrics}")
            metrics_log.log(
                {**eval_metrics, "epoch": completed_steps / steps_per_epoch}, step=completed_steps
            )

        if checkpoint_now:
            save_checkpoint(accelerator, config, model, optimizer, lr_scheduler, completed_steps)
        if completed_steps == config.stop_at_step:
            break  # a time-boxed job: `--resume_from_checkpoint latest` continues it
    progress_bar.close()

    # Save the model, its processor and the zoo description (`save_pretrained` layout).
    accelerator.wait_for_everyone()
    finished = completed_steps == max_train_steps
    if finished:
        save_model(accelerator, model, data, config, eval_metrics)
    accelerator.end_training()
    summary = {"steps": completed_steps, "total_steps": max_train_steps, **eval_metrics}

    # Probe heads (linear probes of the zoo's properties on the embeddings) beside the model,
    # then the model card that lists them, then one push of it all.
    if finished and accelerator.is_main_process:
        (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        summary = finish_run(config, summary)
        (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
