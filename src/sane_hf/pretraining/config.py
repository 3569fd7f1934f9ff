"""`PretrainingConfig`: everything a pretraining run needs, read from YAML with ``key=value``
overrides, and the argument parser of the pretraining script."""

import argparse
import dataclasses
import json
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from accelerate.logging import get_logger
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError

logger = get_logger(__name__)


@strict
@dataclass
class PretrainingConfig:
    """Everything a pretraining run needs; the presets are ``training/configs/*.yaml``.

    Data:
        dataset: path of a zoo dataset (``sane-hf zoo build``); trains on its ``train`` split
            and validates on ``validation``.
        model: ``SaneConfig`` preset (``preset: tiny|cnn|resnet18``) and field overrides. The
            token size is taken from the dataset; ``windowsize`` is the training window.
        batch_size: windows per device and micro-batch (each gives two views).
        epoch_size: windows per epoch over all processes; default: every checkpoint
            ``ceil(num_tokens / windowsize)`` times, so each token is seen once per epoch.
        noise_sigma: multiplicative noise ``x * (1 + sigma * eps)`` on each view.
        permutation: a random function-preserving permutation per view.
        erase_probability: chance of random erasing per view (0 disables it).
        data_device: where the zoo's tokens live: ``auto`` (the accelerator if they take at most
            a quarter of its memory, else host memory), ``device`` or ``cpu``.

    Optimization:
        num_epochs / max_steps: length of the run; ``max_steps`` (optimizer steps) wins when set.
        learning_rate, weight_decay, adam_betas: AdamW (fused on CUDA), peak of the OneCycle
            schedule, which warms up over ``warmup_fraction`` of the steps (0: starts at the peak).
        max_grad_norm: gradient clipping (None disables it).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (Accelerate autocast; bf16 also on CPU).
        torch_compile: compile the model with inductor.

    Run:
        output_dir: checkpoints, logs, and the final model (``save_pretrained``).
        checkpointing_steps: save a checkpoint every this many steps (None: never);
            ``checkpoints_total_limit`` keeps only the newest ones.
        resume_from_checkpoint: a checkpoint folder, or ``latest`` in ``output_dir``.
        stop_at_step: end the run after this step as if it were killed (no final save): for
            time-boxed jobs and for testing resumption.
        logging_steps: log (and measure data-wait time, with device synchronization) every this
            many steps. ``report_to``: an Accelerate tracker (``tensorboard``, ``wandb``, ...) or
            ``none``; metrics also go to ``output_dir/metrics.jsonl``.
        push_to_hub / hub_model_id: upload the final model and the zoo metadata.
    """

    dataset: str | None = None
    output_dir: str = "outputs/sane-pretraining"
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    batch_size: int = 32
    epoch_size: int | None = None
    noise_sigma: float = 0.1
    permutation: bool = True
    erase_probability: float = 0.0
    data_device: str = "auto"
    num_epochs: int = 50
    max_steps: int | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 3e-9
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.3
    max_grad_norm: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    torch_compile: bool = False
    seed: int = 42
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    stop_at_step: int | None = None
    logging_steps: int = 10
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def validate_values(self) -> None:
        """Raise a ValueError naming the first field whose value cannot work (run by @strict)."""
        choices = {
            "mixed_precision": ("no", "bf16", "fp16"),
            "data_device": ("auto", "device", "cpu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ["batch_size", "num_epochs", "gradient_accumulation_steps", "logging_steps"]
        positive += ["epoch_size", "max_steps", "checkpointing_steps", "checkpoints_total_limit"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
        if "preset" not in self.model:
            raise ValueError("the model section needs a `preset` (tiny, cnn or resnet18)")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (the Hub repo to upload to)")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "PretrainingConfig":
        """Build from plain values; ints are accepted for float fields. ``source`` names where
        the values came from in error messages."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown key(s) {unknown} in {source}; valid keys: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        values = {name: _int_to_float(value, hints[name]) for name, value in values.items()}
        try:
            return cls(**values)
        except StrictDataclassError as error:
            raise ValueError(f"invalid value in {source}: {error}") from error

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike, overrides: Sequence[str] = ()
    ) -> "PretrainingConfig":
        """Read a YAML config and apply ``key=value`` overrides (dotted keys for ``model``)."""
        with open(path) as file:
            values = yaml.load(file, Loader=_YamlLoader) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of config keys, got {type(values)}")
        return cls.from_dict(apply_overrides(values, overrides), source=f"{path} or --set")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as file:
            yaml.safe_dump(self.to_dict(), file, sort_keys=False)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string YAML 1.1 makes
    of a number without a dot."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _int_to_float(value: Any, hint: Any) -> Any:
    """``learning_rate: 1`` means 1.0: convert ints where a field (or its list items) is float."""
    if typing.get_origin(hint) is list and isinstance(value, list):
        return [_int_to_float(item, typing.get_args(hint)[0]) for item in value]
    accepts_float = hint is float or float in typing.get_args(hint)
    if accepts_float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_value(text: str) -> Any:
    """A command-line value as YAML 1.2: numbers, ``true``, ``null``, ``[1, 2]``, or a string."""
    return yaml.load(text, Loader=_YamlLoader)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings to a (nested) config dict; dotted keys reach into sections."""
    values = json.loads(json.dumps(values))  # a deep copy of plain YAML data
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {override!r}")
        *sections, name = key.split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {override!r}: {section!r} is not a section")
        target[name] = parse_value(text)
    return values


def build_argument_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``--config``, ``--set`` and one flag per top-level field (added to ``parser`` if given)."""
    parser = parser or argparse.ArgumentParser(description="SANE pretraining with Accelerate")
    parser.add_argument("--config", help="YAML config, e.g. training/configs/tiny.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; dotted keys for the model section (model.d_model=64)",
    )
    for config_field in dataclasses.fields(PretrainingConfig):
        if config_field.name == "model":
            continue
        parser.add_argument(
            "--" + config_field.name.replace("_", "-"),
            dest=f"field_{config_field.name}",
            metavar="VALUE",
            help=f"set {config_field.name} (parsed as YAML)",
        )
    return parser


def config_from_args(args: argparse.Namespace) -> PretrainingConfig:
    """The config of parsed arguments: YAML file, then plain flags, then ``--set``."""
    flags = [
        f"{name.removeprefix('field_')}={value}"
        for name, value in vars(args).items()
        if name.startswith("field_") and value is not None
    ]
    overrides = [*flags, *args.overrides]
    if args.config is None:
        return PretrainingConfig.from_dict(apply_overrides({}, overrides), source="arguments")
    return PretrainingConfig.from_yaml(args.config, overrides)
