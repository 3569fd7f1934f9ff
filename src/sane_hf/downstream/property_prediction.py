"""`SaneForPropertyPrediction` fine-tuned with ``transformers.Trainer`` on a zoo, in units.

SANE's encoder, masked-mean pooling and a linear head regress model properties end to end.
`with_labels` turns a zoo split into what ``Trainer`` expects (``tokens``, ``positions`` and
``labels``), standardizing the labels with training-split statistics (the MSE weighs all
properties alike) and returning that standardization; `LabelStandardization.save_to` writes it
into the model's config, so ``predict_properties`` answers in the properties' own units after
``save_pretrained``/``from_pretrained``::

    train, scale = with_labels(zoo.splits["train"], ["test_acc"])
    validation, _ = with_labels(zoo.splits["validation"], ["test_acc"], standardization=scale)
    model = SaneForPropertyPrediction.from_pretrained("path/to/sane", num_labels=1)
    scale.save_to(model.config)
    Trainer(model, args, train_dataset=train).train()
    predictions = scale.to_units(Trainer(model, args).predict(validation).predictions)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from sane_hf.downstream.embedding import zoo_properties
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import (
    SanePositionEmbeddings,
    SanePreTrainedModel,
    SaneTransformer,
    masked_mean,
)

if TYPE_CHECKING:
    from datasets import Dataset

TRAINER_COLUMNS = ("tokens", "positions", "labels")


@dataclass
class LabelStandardization:
    """Mean and std of every property (training split): ``labels = (value - mean) / std``."""

    names: list[str]
    mean: list[float]
    std: list[float]

    def standardize(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.mean) / self.std

    def to_units(self, predictions: np.ndarray | torch.Tensor) -> np.ndarray:
        """Standardized predictions ``[M, P]`` back in the properties' units."""
        predictions = np.asarray(
            predictions.detach().cpu().float()
            if isinstance(predictions, torch.Tensor)
            else predictions,
            dtype=np.float64,
        )
        return predictions.reshape(len(predictions), -1) * self.std + self.mean

    def save_to(self, config: SaneConfig) -> None:
        """Record the standardization in ``config`` (saved with the model)."""
        config.property_names = list(self.names)
        config.property_mean = list(self.mean)
        config.property_std = list(self.std)

    @classmethod
    def from_config(cls, config: SaneConfig) -> LabelStandardization | None:
        names = getattr(config, "property_names", None)
        if not names:
            return None
        return cls(list(names), list(config.property_mean), list(config.property_std))


def with_labels(
    split: Dataset,
    properties: Sequence[str],
    *,
    standardize: bool = True,
    standardization: LabelStandardization | None = None,
) -> tuple[Dataset, LabelStandardization]:
    """A zoo split with a ``labels`` column ``[P]`` (float32), ready for ``Trainer``.

    Args:
        split: a zoo dataset split (``tokens``, ``positions`` and property columns).
        properties: numeric columns (or ``hyperparameters`` fields) to predict.
        standardize: standardize the labels; with False the standardization is the identity.
        standardization: use these statistics (the training split's, for validation and test);
            default: fitted on ``split``.

    Returns:
        ``(dataset with tokens/positions/labels in torch format, the standardization)``.
    """
    if not properties:
        raise ValueError("with_labels needs at least one property")
    columns = zoo_properties(split)
    values = []
    for name in properties:
        if name not in columns:
            raise ValueError(
                f"property {name!r} is not a column of the zoo; available: {sorted(columns)}"
            )
        column = columns[name]
        if column.dtype.kind not in "fiu":
            raise ValueError(f"property {name!r} is not numeric (dtype {column.dtype})")
        if not np.isfinite(column).all():
            row = int(np.flatnonzero(~np.isfinite(column))[0])
            raise ValueError(
                f"property {name!r} is missing or not finite in row {row} of the split"
            )
        values.append(column.astype(np.float64))
    values = np.stack(values, axis=1)
    if standardization is None:
        if standardize:
            std = values.std(0)
            standardization = LabelStandardization(
                list(properties), values.mean(0).tolist(), np.where(std > 0, std, 1.0).tolist()
            )
        else:
            standardization = LabelStandardization(
                list(properties), [0.0] * len(properties), [1.0] * len(properties)
            )
    elif list(standardization.names) != list(properties):
        raise ValueError(
            f"standardization is for {standardization.names}, not for {list(properties)}"
        )
    labels = standardization.standardize(values).astype(np.float32)
    dataset = split.select_columns(["tokens", "positions"]).add_column("labels", labels.tolist())
    return dataset.with_format("torch"), standardization


@dataclass
class PropertyPredictionOutput(ModelOutput):
    """
    Outputs of [`SaneForPropertyPrediction`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean squared error between `predictions` and `labels`, when labels are given.
        predictions (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Predicted properties.
        embeddings (`torch.FloatTensor` of shape `(batch_size, latent_dim)`):
            Masked mean of the token latents: the model embedding the head reads.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None


class SaneForPropertyPrediction(SanePreTrainedModel):
    """SANE encoder + masked-mean pooling + a linear regression head, trained end to end.

    Linear probes (``probe_features``) keep the encoder frozen; this model fine-tunes it for the
    properties instead, with the standard ``transformers`` interface: ``Trainer`` trains it on
    `with_labels` datasets (``tokens``, ``positions``, ``labels``), and ``Trainer.predict``
    returns the predictions alone (``embeddings`` are ignored at inference through
    ``config.keys_to_ignore_at_inference``). It loads the encoder of a full ``SaneModel``
    checkpoint and starts the head from scratch::

        model = SaneForPropertyPrediction.from_pretrained("path/to/sane", num_labels=3)

    ``config.num_labels`` is the number of properties regressed at once. Labels are standardized
    (`with_labels`): the MSE weighs all properties alike; `predict_properties` answers in units
    once the standardization is in the config (`LabelStandardization.save_to`). Inputs are
    whole sequences (or windows) of normalized tokens; a model longer than the position tables
    or the memory allows should be embedded with ``sane_hf.embed`` and probed instead.
    """

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

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> PropertyPredictionOutput:
        r"""
        Args:
            tokens (`torch.FloatTensor` of shape `(batch_size, sequence, tokensize)`):
                Normalized weight tokens of one network per row.
            positions (`torch.LongTensor` of shape `(batch_size, sequence, 3)`):
                (global, layer, row) index of every token.
            attention_mask (`torch.BoolTensor` of shape `(batch_size, sequence)`, *optional*):
                True on real tokens; padding tokens are neither attended to nor pooled.
            labels (`torch.FloatTensor` of shape `(batch_size, num_labels)` or `(batch_size,)`, *optional*):
                Property values to regress.
        """
        latents = self.encode(tokens, positions, attention_mask)
        embeddings = masked_mean(latents, attention_mask)
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

    @torch.no_grad()
    def predict_properties(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:
        """Predicted properties in their units, by name (needs the standardization in config)."""
        standardization = LabelStandardization.from_config(self.config)
        if standardization is None:
            raise ValueError(
                "config has no property_names/property_mean/property_std: record the labels' "
                "standardization with LabelStandardization.save_to(model.config) before saving"
            )
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        output = self(tokens.to(device, self.dtype), positions.to(device), attention_mask)
        self.train(was_training)
        values = standardization.to_units(output.predictions)
        return {name: values[:, index] for index, name in enumerate(standardization.names)}


__all__: list[Any] = [
    "LabelStandardization",
    "PropertyPredictionOutput",
    "SaneForPropertyPrediction",
    "with_labels",
]
