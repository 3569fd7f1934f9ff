"""The settings of sampling experiments: `SamplingMethod` and `SamplingSettings`.

Kept apart from `sane_hf.recipes.sampling` because they are plain config dataclasses (loaded
by `sane_hf.utils.config`): the CLI builds its flags from them without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sane_hf.downstream.kde_modes import KDE_MODES, KDEMode
from sane_hf.utils.config import LoadableConfig

SAMPLING_KINDS = ("kde", "subsampled", "bootstrapped", "prior")
# The sampling methods compared by default (the demo and `sane-hf sample`).
DEFAULT_METHODS = ("kde", "subsampled")


@dataclass(frozen=True)
class SamplingMethod:
    """One way of drawing networks from SANE (paper Alg. 3 and its variants).

    ``kind``: ``kde`` (draws around the prompts), ``subsampled`` (draw ``num_candidates``, keep
    the best), ``bootstrapped`` (subsample, then refit the KDE on the kept latents for more
    rounds) or ``prior`` (bootstrapping that starts from Gaussian latents, no prompts).
    ``mode``: the KDE mode (``token``/``joint``/``shared``, see `sane_hf.downstream.kde_modes`).
    """

    kind: Literal["kde", "subsampled", "bootstrapped", "prior"]
    mode: KDEMode = "shared"

    def __post_init__(self):
        if self.kind not in SAMPLING_KINDS:
            raise ValueError(f"sampling kind must be one of {SAMPLING_KINDS}, got {self.kind!r}")
        if self.mode not in KDE_MODES:
            raise ValueError(f"KDE mode must be one of {KDE_MODES}, got {self.mode!r}")

    @property
    def name(self) -> str:
        return "SANE prior" if self.kind == "prior" else f"SANE {self.kind} ({self.mode})"


@dataclass
class SamplingSettings(LoadableConfig):
    """How many prompts and samples, how candidates are scored, how samples are fine-tuned.

    ``num_prompts`` checkpoints of the prompt zoo's ``prompt_split`` at ``prompt_epoch`` (default:
    its last epoch), best by ``prompt_metric``, or all of them if the split has fewer (a small
    zoo, or ``test`` for prompts SANE never saw; `choose_prompts` says so). ``num_samples``
    networks per method are evaluated; subsampling and bootstrapping draw ``num_candidates``
    per round and score them on ``score_samples`` training images. Every group is fine-tuned for
    ``finetune_epochs`` (0: only the sampled networks as they are) with the prompts' training
    recipe (optimizer, lr, weight decay, batch size). ``architecture_kwargs`` override the zoo's
    architecture to sample a variant (e.g. ``{"num_classes": 100}`` for a new task).

    With ``baselines`` every SANE method is compared with memorization baselines
    (`sane_hf.downstream.baselines`): prompts plus noise at its median distance to the prompts,
    a noise curve at ``noise_levels`` times the median distance between prompts, and averages of
    two prompts; mistake overlaps are measured against the prompts and up to
    ``novelty_networks`` training checkpoints at the prompts' epoch. Loaded like every sane-hf
    config (`SamplingSettings.load`: these field defaults, then a YAML/JSON file, flags and
    overrides; no sampling presets ship); the values are checked where they are set, for the API and the CLI alike.
    """

    CONFIG_KIND: ClassVar[str] = "sampling"

    num_prompts: int = 30
    prompt_split: str = "train"
    prompt_epoch: int | None = None
    num_samples: int = 5
    num_candidates: int = 25
    rounds: int = 3
    bandwidth: float = 0.2
    prior_sigma: float = 1.0
    score_samples: int = 500
    bn_batches: int = 10
    finetune_epochs: int = 5
    seed: int = 0
    window: int | None = None
    halo: int | None = None
    condition_bn: bool = True
    prompt_metric: str = "val_acc"
    architecture_kwargs: dict[str, Any] | None = None
    baselines: bool = True
    noise_levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    novelty_networks: int = 100

    def __post_init__(self):
        positive = ("num_prompts", "num_samples", "num_candidates", "rounds", "score_samples")
        positive += ("novelty_networks",)
        for name in (*positive, "window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        for name in ("bn_batches", "finetune_epochs", "halo", "prompt_epoch", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.num_candidates < self.num_samples:  # the best num_samples of the candidates
            raise ValueError(
                f"num_candidates ({self.num_candidates}) must be >= num_samples "
                f"({self.num_samples})"
            )
        if self.prompt_split not in ("train", "validation", "test"):
            raise ValueError(
                f"prompt_split must be train, validation or test, got {self.prompt_split!r}"
            )
        if not self.bandwidth >= 0:  # 0: the prompts' own latents
            raise ValueError(f"bandwidth must be >= 0, got {self.bandwidth}")
        if not self.prior_sigma > 0:
            raise ValueError(f"prior_sigma must be > 0, got {self.prior_sigma}")
        if any(not level > 0 for level in self.noise_levels):
            raise ValueError(f"noise_levels must be > 0, got {self.noise_levels}")


__all__ = ["DEFAULT_METHODS", "SAMPLING_KINDS", "SamplingMethod", "SamplingSettings"]
