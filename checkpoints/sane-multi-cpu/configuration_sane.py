"""Configuration of SANE, the sequential autoencoder over weight tokens (Schürholt et al., ICML 2024).

This file is copied next to the weights by ``save_pretrained`` (``trust_remote_code`` loading),
so it imports nothing from ``sane_hf``; only `SaneConfig.from_preset` reads sane-hf's preset
files (``sane_hf/presets/model/*.yaml``).
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

POSITION_SCHEMES = ("absolute", "relative")
LOSS_NORMALIZATIONS = ("none", "batch", "window", "token")


@strict
class SaneConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SaneModel`]: a transformer encoder that maps every weight token of a
    neural network to a latent vector, a decoder that maps latents back to tokens, and a
    projection head for the contrastive loss between two augmented views of a token window.

    The defaults are the `"cnn"` preset (the shapes of the reference code for CNN model zoos);
    [`SaneConfig.from_preset`] gives the others.

    Args:
        tokensize (`int`, *optional*, defaults to 289):
            Number of weight values per token (T). 289 = 32*9+1 for CNN zoos, 288 for ResNet-18.
        d_model (`int`, *optional*, defaults to 1024):
            Width of the transformer blocks. Must be even (half of it holds the (global, layer)
            position embedding, the other half the row position embedding) and divisible by
            `n_heads`.
        n_heads (`int`, *optional*, defaults to 8):
            Number of attention heads of every block.
        n_layers (`int`, *optional*, defaults to 8):
            Number of transformer blocks in the encoder, and again in the decoder.
        latent_dim (`int`, *optional*, defaults to 128):
            Size of the latent vector of one token (the "hyper-representation").
        max_positions (`tuple[int, int, int]`, *optional*, defaults to `(2048, 64, 512)`):
            Sizes of the three learned position tables: global token index, layer index, row
            index within the layer. Positions at or beyond these limits raise an error.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the embeddings, the attention probabilities and every residual branch.
        projection_dim (`int`, *optional*, defaults to 128):
            Output size of the projection head whose outputs enter the contrastive loss.
        gamma (`float`, *optional*, defaults to 0.05):
            Weight of the contrastive term: `loss = gamma * NT-Xent + (1 - gamma) * MSE`.
        contrastive_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the NT-Xent loss (`temperature` is reserved by transformers for text
            generation).
        windowsize (`int`, *optional*, defaults to 64):
            Number of consecutive tokens per training window. Informative for training and
            embedding code: the model itself accepts any window length up to `max_positions[0]`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialization of linear and embedding weights.
        layer_norm_eps (`float`, *optional*, defaults to 1e-05):
            Epsilon of the layer norms.
        zoo_dataset (`str`, *optional*):
            Hub id of the model-zoo dataset the model was trained on; written into the model card.
        position_scheme (`str`, *optional*, defaults to `"absolute"`):
            What the three position indices mean. `"absolute"`: (global token index, layer
            index, row index) of one architecture. `"relative"`: (relative depth bucket,
            layer-type id, token index within the layer) of universal tokens, which do not
            depend on one architecture's depth; the layer table is then the layer-type
            embedding.
        loss_normalization (`str`, *optional*, defaults to `"none"`):
            Masked loss normalization of the reconstruction loss: `"batch"`, `"window"` or
            `"token"` standardize targets and reconstructions alike with the mean and standard
            deviation of the targets' real values over the batch, each window or each token
            (for tokens of raw, unstandardized weights); `"none"` scores them as they are.
        token_scheme (`dict`, *optional*):
            The universal token scheme the model reads (`sane_hf.weights.universal.TokenScheme`
            as a dict), recorded so that a saved model says how it reads networks; `None` for
            models of per-parameter standardized zoo tokens.

    Example:

    ```python
    >>> from sane_hf import SaneConfig, SaneModel

    >>> config = SaneConfig.from_preset("tiny")
    >>> model = SaneModel(config)
    ```"""

    model_type = "sane"

    tokensize: int = 289
    d_model: int = 1024
    n_heads: int = 8
    n_layers: int = 8
    latent_dim: int = 128
    max_positions: list[int] | tuple[int, int, int] = (2048, 64, 512)
    dropout: float | int = 0.0
    projection_dim: int = 128
    gamma: float | int = 0.05
    contrastive_temperature: float | int = 0.1
    windowsize: int = 64
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    zoo_dataset: str | None = None
    position_scheme: str = "absolute"
    loss_normalization: str = "none"
    token_scheme: dict | None = None

    def __post_init__(self, **kwargs):
        self.max_positions = tuple(self.max_positions)
        if len(self.max_positions) != 3 or min(self.max_positions) < 1:
            raise ValueError(
                "max_positions must be three positive table sizes (global, layer, row), "
                f"got {self.max_positions}"
            )
        for name in ("tokensize", "d_model", "n_heads", "n_layers", "latent_dim", "windowsize"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % 2 or self.d_model % self.n_heads:
            raise ValueError(
                f"d_model must be even and divisible by n_heads, got d_model={self.d_model}, "
                f"n_heads={self.n_heads}"
            )
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(
                f"gamma weighs two loss terms and must lie in [0, 1], got {self.gamma}"
            )
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(
                f"position_scheme must be one of {POSITION_SCHEMES}, got {self.position_scheme!r}"
            )
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                f"got {self.loss_normalization!r}"
            )
        if self.contrastive_temperature <= 0:
            raise ValueError(
                f"contrastive_temperature must be positive, got {self.contrastive_temperature}"
            )
        super().__post_init__(**kwargs)
        # Every SANE checkpoint also loads as its property head with trust_remote_code.
        head = {"AutoModelForSequenceClassification": "modeling_sane.SaneForPropertyPrediction"}
        self.auto_map = head | (getattr(self, "auto_map", None) or {})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SaneConfig":
        """A configuration of the preset `name` (`"tiny"`, `"cnn"`, `"resnet18"`, `"multi-cpu"`: the YAML files
        of `sane_hf/presets/model/`, so it needs sane-hf installed), with `overrides` applied on
        top (for example `tokensize=288`)."""
        from importlib import resources

        import yaml

        folder = resources.files("sane_hf") / "presets" / "model"
        names = sorted(
            p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
        )
        if name not in names:
            raise ValueError(f"unknown SANE preset {name!r}; choose one of {names}")
        values = yaml.safe_load((folder / f"{name}.yaml").read_text()) or {}
        return cls(**{**values, **overrides})


SaneConfig.register_for_auto_class()

__all__ = ["SaneConfig"]
