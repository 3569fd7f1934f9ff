"""SANE: a transformer autoencoder over the weight tokens of trained neural networks.

Schürholt, Mahoney, Borth, "Towards Scalable and Versatile Weight Space Learning", ICML 2024.
A checkpoint is cut into tokens of `tokensize` weight values, each with a (global index, layer
index, row index) position. The encoder maps every token of a window to a latent vector, the
decoder maps latents back to tokens, and a projection head pools the latents of a window for a
contrastive loss between two augmented views.

This file is copied next to the weights by `save_pretrained` so that checkpoints load with
`trust_remote_code=True` where sane-hf is not installed: it imports nothing from `sane_hf`.
`save_pretrained` and `push_to_hub` are transformers' own; SANE's model card is written by the
free functions of `sane_hf.hub`.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_sane import SaneConfig

POSITION_NAMES = ("global", "layer", "row")


def masked_mse(
    reconstructions: torch.Tensor, targets: torch.Tensor, value_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error over the entries where `value_mask` is True (all entries if None).

    Padding is zeroed with `where` before squaring rather than multiplied away after, so
    whatever a padded target holds (even NaN) reaches neither the loss nor its gradient.
    Computed in float32.
    """
    error = reconstructions.float() - targets.float()
    if value_mask is None:
        return error.square().mean()
    error = torch.where(value_mask.bool(), error, 0.0)
    return error.square().sum() / value_mask.sum().clamp_min(1)


def normalize_for_loss(
    reconstructions: torch.Tensor,
    targets: torch.Tensor,
    value_mask: torch.Tensor | None,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked loss normalization (MultiZoo-SANE, GeoSANE): standardize targets and
    reconstructions [B, W, T] alike with the mean and std of the targets' real values over the
    whole batch (`"batch"`), each window (`"window"`) or each token (`"token"`).

    The statistics are constants of the loss (no gradient flows through them), so raw weights
    of any scale can be reconstructed without statistics fitted on a zoo. `"none"` passes both
    through.
    """
    if mode == "none":
        return reconstructions, targets
    dims = {"batch": (0, 1, 2), "window": (1, 2), "token": (2,)}[mode]
    targets = targets.float()
    mask = torch.ones_like(targets) if value_mask is None else value_mask.to(targets.dtype)
    with torch.no_grad():
        count = mask.sum(dim=dims, keepdim=True).clamp_min(1)
        mean = (targets * mask).sum(dim=dims, keepdim=True) / count
        variance = ((targets - mean).square() * mask).sum(dim=dims, keepdim=True) / count
        std = variance.sqrt().clamp_min(1e-6)
    return (reconstructions.float() - mean) / std, (targets - mean) / std


def nt_xent(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of `projections` [2B, P], whose rows i and i+B are the two views.

    Every row is classified against the 2B - 1 others by cosine similarity / temperature, with
    its other view as the correct class. Computed in float32.
    """
    num_rows = projections.shape[0]
    embeddings = F.normalize(projections.float(), dim=-1)
    similarity = embeddings @ embeddings.T / temperature
    self_pairs = torch.eye(num_rows, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_pairs, float("-inf"))
    other_view = torch.arange(num_rows, device=similarity.device).roll(num_rows // 2)
    return F.cross_entropy(similarity, other_view)


def masked_mean(values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [B, W, D] over the real tokens of each window -> [B, D]."""
    if attention_mask is None:
        return values.mean(dim=1)
    weights = attention_mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def _real_value_mask(
    target_tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    value_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Combine the token mask [B, W] and the value mask [B, W, T] into one [B, W, T] mask."""
    if value_mask is not None and value_mask.shape != target_tokens.shape:
        raise ValueError(
            f"value_mask must have the shape of target_tokens {tuple(target_tokens.shape)}, "
            f"got {tuple(value_mask.shape)}"
        )
    if attention_mask is None:
        return value_mask
    token_mask = attention_mask.bool().unsqueeze(-1).expand_as(target_tokens)
    return token_mask if value_mask is None else token_mask & value_mask.bool()


@dataclass
class SaneModelOutput(ModelOutput):
    """
    Outputs of [`SaneModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `gamma * contrastive_loss + (1 - gamma) * reconstruction_loss` when both terms are
            computed, else the one that is.
        reconstruction_loss (`torch.FloatTensor` of shape `()`, *optional*):
            MSE between `reconstructions` and `target_tokens` over real entries only; returned
            when `target_tokens` is given.
        contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*):
            NT-Xent between the projections of the two views; returned when `num_views=2`.
        latents (`torch.FloatTensor` of shape `(batch_size, window, latent_dim)`):
            One latent vector per token.
        reconstructions (`torch.FloatTensor` of shape `(batch_size, window, tokensize)`):
            The decoded tokens.
        projections (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            Projection-head output of every window (pooled over its real tokens).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    reconstructions: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None


@dataclass
class SaneEncoderOutput(ModelOutput):
    """
    Outputs of [`SaneEncoderModel`].

    Args:
        latents (`torch.FloatTensor` of shape `(batch_size, window, latent_dim)`):
            One latent vector per token.
    """

    latents: torch.FloatTensor | None = None


@dataclass
class SaneDecoderOutput(ModelOutput):
    """
    Outputs of [`SaneDecoderModel`].

    Args:
        reconstructions (`torch.FloatTensor` of shape `(batch_size, window, tokensize)`):
            The decoded tokens.
    """

    reconstructions: torch.FloatTensor | None = None


def check_positions(
    positions: torch.Tensor, max_positions: tuple[int, int, int], check_range: bool = True
) -> None:
    """Raise a ValueError naming the position component that falls outside its table.

    Shape and dtype are always checked. The range check reads the extremes back to the host, a
    device synchronization that stalls the GPU queue, so it is skipped with `check_range=False`
    and under torch.compile.
    """
    if positions.dim() != 3 or positions.shape[-1] != 3:
        raise ValueError(
            f"positions must have shape [batch, window, 3] (global, layer, row index), "
            f"got {tuple(positions.shape)}"
        )
    if positions.is_floating_point():
        raise ValueError(f"positions must be integer indices, got dtype {positions.dtype}")
    if not check_range or torch.compiler.is_compiling() or positions.numel() == 0:
        return
    flat = positions.reshape(-1, 3)
    smallest, largest = flat.amin(dim=0).tolist(), flat.amax(dim=0).tolist()
    for name, low, high, limit in zip(POSITION_NAMES, smallest, largest, max_positions):
        if low < 0 or high >= limit:
            raise ValueError(
                f"{name} position index out of range: got values in [{low}, {high}], but the "
                f"{name} position table has {limit} entries (config.max_positions="
                f"{tuple(max_positions)}); use a config with larger max_positions"
            )


class SanePositionEmbeddings(nn.Module):
    """Learned positions: `concat(E_global[g] + E_layer[l], E_row[r])`, width d_model.

    Chunks of one weight row share layer and row index and differ in the global index only.
    Every forward checks that the positions fit the tables unless `check_range` is False (see
    `set_position_checks`).
    """

    def __init__(self, config: SaneConfig):
        super().__init__()
        half_width = config.d_model // 2
        self.max_positions = tuple(config.max_positions)
        self.check_range = True
        global_size, layer_size, row_size = self.max_positions
        self.global_embeddings = nn.Embedding(global_size, half_width)
        self.layer_embeddings = nn.Embedding(layer_size, half_width)
        self.row_embeddings = nn.Embedding(row_size, half_width)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        check_positions(positions, self.max_positions, self.check_range)
        global_index, layer_index, row_index = positions.unbind(dim=-1)
        global_and_layer = self.global_embeddings(global_index) + self.layer_embeddings(layer_index)
        return torch.cat([global_and_layer, self.row_embeddings(row_index)], dim=-1)


def set_position_checks(module: nn.Module, enabled: bool) -> None:
    """Turn the per-forward range check of every SANE position table in `module` on or off.

    The check reads values back to the host: a device synchronization per forward pass, which
    keeps the CPU from queueing the next kernels and rules out CUDA graphs. Loops that validate
    their positions once up front (pretraining checks the zoo's positions against the tables,
    embedding checks the whole sequence) turn it off for the hot path. An out-of-range position
    then fails inside the embedding lookup instead, with a less helpful message.
    """
    for submodule in module.modules():
        if isinstance(submodule, SanePositionEmbeddings):
            submodule.check_range = enabled


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention on [B, H, W, D] inputs; the mask is additive. Returns [B, W, H, D]."""
    attention_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attention_weights = attention_weights + attention_mask
    attention_weights = F.softmax(attention_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attention_weights = F.dropout(attention_weights, p=dropout, training=module.training)
    attention_output = torch.matmul(attention_weights, value).transpose(1, 2).contiguous()
    return attention_output, attention_weights


class SaneAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused, bias-free QKV projection."""

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.dropout
        # Read by transformers' SDPA and flash-attention paths, which default to causal.
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch_size, window, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch_size, window, 3, self.num_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # Under CPU autocast the projections run in bf16 (AMX matmuls, several times faster than
        # fp32), but attention itself stays float32: the CPU's bf16 attention kernels on these
        # small heads are slower than fp32 (SDPA's bf16 backward by about 15x).
        cpu_autocast = hidden_states.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        dtype = torch.float32 if cpu_autocast else query.dtype
        with torch.autocast("cpu", enabled=False) if cpu_autocast else nullcontext():
            attention_output, _ = attention_interface(
                self,
                query.to(dtype),
                key.to(dtype),
                value.to(dtype),
                attention_mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
            )
        return self.o_proj(attention_output.reshape(batch_size, window, -1))


class SaneMLP(nn.Module):
    def __init__(self, config: SaneConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(4 * config.d_model, config.d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class SaneLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=False)
        self.attention = SaneAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=False)
        self.mlp = SaneMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attention_output = self.attention(self.attention_norm(hidden_states), attention_mask)
        hidden_states = hidden_states + self.dropout(attention_output)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


def check_window_shapes(
    inputs: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    in_features: int,
) -> None:
    """Raise a ValueError when the window tensors do not fit together (expected vs got)."""
    if inputs.dim() != 3 or inputs.shape[-1] != in_features:
        raise ValueError(
            f"expected inputs of shape [batch, window, {in_features}], got {tuple(inputs.shape)}"
        )
    if positions.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f"positions {tuple(positions.shape)} do not match inputs {tuple(inputs.shape)}: "
            "expected [batch, window, 3]"
        )
    if attention_mask is not None and attention_mask.shape != inputs.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape [batch, window] = {tuple(inputs.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )


class SaneTransformer(nn.Module):
    """One half of SANE: `Linear(in -> d_model)` + positions, pre-LN blocks, `Linear(d_model -> out)`.

    The encoder maps tokens (in = tokensize) to latents (out = latent_dim); the decoder is the
    same stack in the other direction, with its own weights. Both add the same position vectors,
    looked up once in the model's one set of position tables (as in the paper).
    """

    def __init__(self, config: SaneConfig, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.input_projection = nn.Linear(in_features, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([SaneLayer(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=False)
        self.output_projection = nn.Linear(config.d_model, out_features)

    def forward(
        self,
        inputs: torch.Tensor,
        position_embeddings: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Map `inputs` [B, W, in_features] with their `position_embeddings` [B, W, d_model]
        (`SanePositionEmbeddings` of the positions) to [B, W, out_features].

        `attention_mask` [B, W] is True on real tokens; padded tokens are never attended to.
        """
        inputs = inputs.to(self.input_projection.weight.dtype)
        hidden_states = self.input_projection(inputs) + position_embeddings
        hidden_states = self.dropout(hidden_states)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return self.output_projection(self.norm(hidden_states))


class SaneProjectionHead(nn.Module):
    """Masked mean of a window's latents over its real tokens, then an MLP to `projection_dim`.

    Pooling makes the head independent of the window length (the reference flattens the window,
    which ties the head to one window size), and matches how model embeddings are formed.
    """

    def __init__(self, config: SaneConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.latent_dim, config.projection_dim)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(config.projection_dim, config.projection_dim)

    def forward(
        self, latents: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        pooled = masked_mean(latents, attention_mask)
        return self.fc2(self.activation(self.fc1(pooled)))


class SanePreTrainedModel(PreTrainedModel):
    """Weight initialization, attention backends and checkpointing shared by the SANE models."""

    config_class = SaneConfig
    config: SaneConfig
    base_model_prefix = "sane"
    main_input_name = "tokens"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["SaneLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, refusing weights that do not fit the config.

        transformers initializes missing weights at random and only reports it in a load
        table; a SANE with random layers embeds and decodes silently wrong, so a checkpoint
        with missing or unexpected weights (more or fewer layers than ``config.json`` says) is
        an error naming the first of them. Weights a class leaves out on purpose
        (``_keys_to_ignore_on_load_missing`` / ``_unexpected``) pass.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = sorted(str(key) for key in info.get(kind) or ())
            if keys:
                raise ValueError(
                    f"{pretrained_model_name_or_path}: the weights do not fit config.json "
                    f"({len(keys)} {kind.replace('_', ' ')}, first {keys[0]!r}): the folder "
                    "mixes files of different models"
                )
        return (model, info) if wants_info else model

    def set_position_checks(self, enabled: bool) -> None:
        """Turn the range check of positions on or off; see `set_position_checks`."""
        set_position_checks(self, enabled)

    def encode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents [B, W, latent_dim] of token windows [B, W, tokensize] at `positions`
        [B, W, 3] (models with an encoder); `attention_mask` [B, W] is True on real tokens."""
        check_window_shapes(tokens, positions, attention_mask, self.config.tokensize)
        return self.encoder(tokens, self.position_embeddings(positions), attention_mask)

    def decode(
        self,
        latents: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens [B, W, tokensize] decoded from latents [B, W, latent_dim] at `positions`
        [B, W, 3] (models with a decoder); `attention_mask` [B, W] is True on real tokens."""
        check_window_shapes(latents, positions, attention_mask, self.config.latent_dim)
        return self.decoder(latents, self.position_embeddings(positions), attention_mask)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)


class SaneModel(SanePreTrainedModel):
    """SANE autoencoder: encoder, decoder and projection head, with the pretraining loss.

    `model.encode(tokens, positions, attention_mask)` gives latents and
    `model.decode(latents, positions, attention_mask)` gives tokens, for code that needs one half.
    Encoder and decoder share one set of position tables (`position_embeddings`).
    """

    def __init__(self, config: SaneConfig):
        super().__init__(config)
        self.position_embeddings = SanePositionEmbeddings(config)
        self.encoder = SaneTransformer(config, config.tokensize, config.latent_dim)
        self.decoder = SaneTransformer(config, config.latent_dim, config.tokensize)
        self.projection_head = SaneProjectionHead(config)
        self.post_init()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        target_tokens: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        num_views: int = 1,
    ) -> SaneModelOutput:
        r"""
        Args:
            tokens (`torch.FloatTensor` of shape `(batch_size, window, tokensize)`):
                Weight tokens of windows. With `num_views=2`, rows `i` and `i + batch_size // 2`
                are two augmented views of the same window (views stacked on the batch axis).
            positions (`torch.LongTensor` of shape `(batch_size, window, 3)`):
                (global token index, layer index, row index) of every token.
            attention_mask (`torch.BoolTensor` of shape `(batch_size, window)`, *optional*):
                True on real tokens, False on padding tokens of short windows. Padding tokens are
                not attended to, not pooled by the projection head and not in the MSE.
            target_tokens (`torch.FloatTensor` of shape `(batch_size, window, tokensize)`, *optional*):
                Clean tokens to reconstruct (the un-noised version of each view). Enables the
                reconstruction loss.
            value_mask (`torch.BoolTensor` of shape `(batch_size, window, tokensize)`, *optional*):
                True on real weight values, False on the zero padding at the end of a row's last
                token; the MSE counts real values of real tokens only.
            num_views (`int`, *optional*, defaults to 1):
                2 to compute the contrastive loss between the two halves of the batch.
        """
        if num_views not in (1, 2):
            raise ValueError(f"num_views must be 1 or 2, got {num_views}")
        if num_views == 2 and tokens.shape[0] % 2:
            raise ValueError(
                f"num_views=2 needs the two views stacked on the batch axis, but the batch size "
                f"{tokens.shape[0]} is odd"
            )
        check_window_shapes(tokens, positions, attention_mask, self.config.tokensize)
        position_embeddings = self.position_embeddings(positions)
        latents = self.encoder(tokens, position_embeddings, attention_mask)
        reconstructions = self.decoder(latents, position_embeddings, attention_mask)
        projections = self.projection_head(latents, attention_mask)

        reconstruction_loss = contrastive_loss = loss = None
        if target_tokens is not None:
            mask = _real_value_mask(target_tokens, attention_mask, value_mask)
            scored, targets = normalize_for_loss(
                reconstructions, target_tokens, mask, self.config.loss_normalization
            )
            reconstruction_loss = masked_mse(scored, targets, mask)
            loss = reconstruction_loss
        if num_views == 2:
            contrastive_loss = nt_xent(projections, self.config.contrastive_temperature)
            loss = contrastive_loss
        if reconstruction_loss is not None and contrastive_loss is not None:
            gamma = self.config.gamma
            loss = gamma * contrastive_loss + (1 - gamma) * reconstruction_loss
        return SaneModelOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            contrastive_loss=contrastive_loss,
            latents=latents,
            reconstructions=reconstructions,
            projections=projections,
        )


class SaneEncoderModel(SanePreTrainedModel):
    """The encoder of SANE alone: tokens -> latents. Loads the encoder and the position tables
    of a full SANE checkpoint."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^decoder\.", r"^projection_head\."]

    def __init__(self, config: SaneConfig):
        super().__init__(config)
        self.position_embeddings = SanePositionEmbeddings(config)
        self.encoder = SaneTransformer(config, config.tokensize, config.latent_dim)
        self.post_init()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> SaneEncoderOutput:
        """Encode `tokens` [B, W, tokensize] at `positions` [B, W, 3] into latents [B, W, latent_dim];
        `attention_mask` [B, W] is True on real tokens."""
        return SaneEncoderOutput(latents=self.encode(tokens, positions, attention_mask))


class SaneDecoderModel(SanePreTrainedModel):
    """The decoder of SANE alone: latents -> tokens. Loads the decoder and the position tables
    of a full SANE checkpoint."""

    main_input_name = "latents"
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^encoder\.", r"^projection_head\."]

    def __init__(self, config: SaneConfig):
        super().__init__(config)
        self.position_embeddings = SanePositionEmbeddings(config)
        self.decoder = SaneTransformer(config, config.latent_dim, config.tokensize)
        self.post_init()

    def forward(
        self,
        latents: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> SaneDecoderOutput:
        """Decode `latents` [B, W, latent_dim] at `positions` [B, W, 3] into tokens
        [B, W, tokensize]; `attention_mask` [B, W] is True on real tokens."""
        return SaneDecoderOutput(reconstructions=self.decode(latents, positions, attention_mask))


@dataclass
class PropertyPredictionOutput(ModelOutput):
    """Outputs of [`SaneForPropertyPrediction`]: `loss` (MSE against `labels`), `predictions`
    [B, num_labels] and `embeddings` [B, latent_dim] (the pooled latents the head reads)."""

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None


class SaneForPropertyPrediction(SanePreTrainedModel):
    """SANE encoder + masked-mean pooling + a linear regression head, fine-tuned end to end:
    `from_pretrained(sane_checkpoint, num_labels=P)` loads the encoder, starts the head from
    scratch; `Trainer` trains it on `sane_hf.downstream.property_prediction.with_labels` data."""

    _keys_to_ignore_on_load_unexpected = (r"^decoder\.", r"^projection_head\.")
    _keys_to_ignore_on_load_missing = (r"^head\.",)  # a SaneModel checkpoint has no head yet

    def __init__(self, config: SaneConfig):
        super().__init__(config)
        self.position_embeddings = SanePositionEmbeddings(config)
        self.encoder = SaneTransformer(config, config.tokensize, config.latent_dim)
        self.head = nn.Linear(config.latent_dim, config.num_labels)
        if not getattr(config, "keys_to_ignore_at_inference", None):
            config.keys_to_ignore_at_inference = ["embeddings"]
        self.post_init()

    def forward(self, tokens, positions, attention_mask=None, labels=None):
        """Regress `labels` [B, num_labels] (or [B]) of the networks whose `tokens` [B, W, T]
        sit at `positions` [B, W, 3]; `attention_mask` [B, W] is True on real tokens."""
        embeddings = masked_mean(self.encode(tokens, positions, attention_mask), attention_mask)
        predictions = self.head(embeddings)
        loss = None
        if labels is not None:
            labels = labels.to(predictions.dtype).view(len(predictions), -1)
            if labels.shape != predictions.shape:
                raise ValueError(
                    f"labels must be [batch, num_labels={self.config.num_labels}], "
                    f"got {tuple(labels.shape)}"
                )
            loss = F.mse_loss(predictions.float(), labels.float())
        return PropertyPredictionOutput(loss=loss, predictions=predictions, embeddings=embeddings)


SaneModel.register_for_auto_class("AutoModel")
SaneForPropertyPrediction.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "PropertyPredictionOutput",
    "SaneDecoderModel",
    "SaneDecoderOutput",
    "SaneEncoderModel",
    "SaneEncoderOutput",
    "SaneForPropertyPrediction",
    "SaneModel",
    "SaneModelOutput",
    "SanePreTrainedModel",
    "masked_mse",
    "normalize_for_loss",
    "nt_xent",
    "set_position_checks",
]
