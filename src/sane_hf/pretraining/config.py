"""`PretrainingConfig`: everything a pretraining run needs, loaded like every sane-hf config
(preset name or YAML file, then flags, then ``key=value`` overrides: `sane_hf.utils.config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from sane_hf.utils.config import LoadableConfig, build_config

# Fields that say where a run reads and writes, not how it trains: a resume may change them.
RUN_LOCATION_FIELDS = ("dataset", "output_dir", "resume_from_checkpoint", "allow_config_change")
# Fields a resume may change without changing the training it continues.
RESUMABLE_FIELDS = (
    *RUN_LOCATION_FIELDS,
    "stop_at_step",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "logging_steps",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "data_device",
)


@dataclass
class ModelSection:
    """The ``model`` section of a pretraining config: a `SaneConfig` preset
    (``sane_hf/presets/model/<preset>.yaml``: ``tiny``, ``cnn``, ``resnet18``) and the
    `SaneConfig` fields it changes (flags ``--model.d-model 64``, or ``--set model.d_model=64``).
    A field left null keeps the preset's value; ``tokensize`` and ``zoo_dataset`` come from the
    zoo dataset unless set. The fields are SaneConfig's, one for one (a test checks it)."""

    preset: str | None = None
    tokensize: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    latent_dim: int | None = None
    max_positions: list[int] | None = None
    dropout: float | None = None
    projection_dim: int | None = None
    gamma: float | None = None
    contrastive_temperature: float | None = None
    windowsize: int | None = None
    initializer_range: float | None = None
    layer_norm_eps: float | None = None
    zoo_dataset: str | None = None
    position_scheme: str | None = None
    loss_normalization: str | None = None
    token_scheme: dict | None = None

    def __post_init__(self):
        if self.preset is None:
            raise ValueError("the model section needs a `preset` (tiny, cnn or resnet18)")

    def changes(self) -> dict[str, Any]:
        """The fields set here: what the section changes in its preset."""
        return {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}

    def to_dict(self) -> dict[str, Any]:
        """``preset`` and the fields set (the unset ones are the preset's, not null)."""
        return {"preset": self.preset, **self.changes()}


@dataclass
class PretrainingConfig(LoadableConfig):
    """Everything a pretraining run needs; the presets are ``sane_hf/presets/pretraining/*.yaml``
    (``tiny``, ``cnn``, ``resnet18``), loaded by `PretrainingConfig.load`.

    Data:
        dataset: path of a zoo dataset (``sane-hf zoo build``); trains on its ``train`` split
            and validates on ``validation``.
        model: `ModelSection`: a ``SaneConfig`` preset (``preset: tiny|cnn|resnet18``) and the
            fields it changes. The token size is taken from the dataset; ``windowsize`` is the
            training window.
        batch_size: windows per device and micro-batch (each gives two views).
        epoch_size: windows per epoch over all processes; default: every checkpoint
            ``ceil(num_tokens / windowsize)`` times, so each token is seen once per epoch.
        noise_sigma: multiplicative noise ``x * (1 + sigma * eps)`` on each view (>= 0).
        permutation: a random function-preserving permutation per view.
        erase_probability: chance of random erasing per view, in [0, 1] (0 disables it).
        data_device: where the zoo's tokens live: ``auto`` (the accelerator if they take at most
            a quarter of its memory, else host memory), ``device`` or ``cpu``.

    Optimization:
        num_epochs / max_steps: length of the run; ``max_steps`` (optimizer steps) wins when set.
        learning_rate, weight_decay, adam_betas: AdamW (fused on CUDA), peak of the OneCycle
            schedule, which warms up over ``warmup_fraction`` of the steps (0: starts at the peak).
        max_grad_norm: gradient clipping, > 0 (None disables it; a negative norm would reverse
            the gradients).
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (Accelerate autocast; bf16 also on CPU).
        torch_compile: compile the model with inductor.

    Run:
        output_dir: checkpoints, logs, and the final model (``save_pretrained``).
        checkpointing_steps: save a checkpoint every this many steps (None: never);
            ``checkpoints_total_limit`` keeps only the newest ones.
        resume_from_checkpoint: a checkpoint folder, or ``latest`` in ``output_dir`` (the newest
            complete one). A resume must use the config the run was started with (saved as
            ``pretraining_config.yaml``); ``allow_config_change`` accepts a changed one.
        stop_at_step: end the run after this step as if it were killed (no final save): for
            time-boxed jobs and for testing resumption.
        logging_steps: log (and measure data-wait time, with device synchronization) every this
            many steps. ``report_to``: an Accelerate tracker (``tensorboard``, ``wandb``, ...) or
            ``none``; metrics also go to ``output_dir/metrics.jsonl``.
        push_to_hub / hub_model_id: upload the final model and the zoo metadata.
        allow_config_change: resume although the training settings differ from the saved ones.
    """

    CONFIG_KIND: ClassVar[str] = "pretraining"

    dataset: str | None = None
    output_dir: str = "outputs/sane-pretraining"
    model: ModelSection = field(default_factory=lambda: ModelSection("tiny"))
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
    allow_config_change: bool = False
    stop_at_step: int | None = None
    logging_steps: int = 10
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def __post_init__(self):
        if isinstance(self.model, Mapping):  # PretrainingConfig(model={"preset": "cnn"})
            self.model = build_config(ModelSection, self.model, "the model section")
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first field whose value cannot work; the API
        and the CLI both end up here, so both refuse a value with the same message."""
        choices = {
            "mixed_precision": ("no", "bf16", "fp16"),
            "data_device": ("auto", "device", "cpu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ["batch_size", "num_epochs", "gradient_accumulation_steps", "logging_steps"]
        positive += ["epoch_size", "max_steps", "checkpointing_steps", "checkpoints_total_limit"]
        positive += ["stop_at_step"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be > 0 (null disables clipping), got {self.max_grad_norm}"
            )
        if not self.noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")
        if not 0 <= self.erase_probability <= 1:
            raise ValueError(f"erase_probability must lie in [0, 1], got {self.erase_probability}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:  # negative decay pushes the weights away from zero
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        self.model_config()  # SaneConfig checks the model section (n_layers, n_heads, ...)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (the Hub repo to upload to)")

    def model_config(self, **overrides: Any):
        """The ``SaneConfig`` of the ``model`` section (its preset plus field overrides) with
        ``overrides`` on top; its own checks name a bad field as ``model.<field>``."""
        from huggingface_hub.errors import StrictDataclassFieldValidationError

        from sane_hf.models.sane.configuration_sane import SaneConfig

        try:
            config = SaneConfig.from_preset(
                self.model.preset, **{**self.model.changes(), **overrides}
            )
        except (ValueError, TypeError, StrictDataclassFieldValidationError) as error:
            # strict dataclass errors put the reason on the lines after the field name
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ValueError(f"model: {message}") from None
        if not 0 <= config.dropout < 1:
            raise ValueError(f"model: dropout must lie in [0, 1), got {config.dropout}")
        return config

    def changed_fields(self, saved: Mapping[str, Any]) -> list[str]:
        """Training settings that differ from a saved run's config (``RESUMABLE_FIELDS`` aside)."""
        wanted = self.to_dict()
        return sorted(
            name
            for name in saved.keys() | wanted.keys()
            if name not in RESUMABLE_FIELDS and saved.get(name) != wanted.get(name)
        )


__all__ = [
    "ModelSection",
    "PretrainingConfig",
]
