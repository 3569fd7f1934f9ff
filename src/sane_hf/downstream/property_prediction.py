"""`SaneForPropertyPrediction` (in ``modeling_sane.py``) fine-tuned with ``transformers.Trainer``
on a zoo, in units.

SANE's encoder, masked-mean pooling and a linear head regress model properties end to end.
`with_labels` turns a zoo split into what ``Trainer`` expects (``tokens``, ``positions`` and
``labels``), standardizing the labels with training-split statistics (the MSE weighs all
properties alike) and returning that standardization; `LabelStandardization.save_to` writes it
into the model's config, so `predict_properties` answers in the properties' own units after
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
from typing import TYPE_CHECKING

import numpy as np
import torch

from sane_hf.downstream.embedding import zoo_properties
from sane_hf.models.sane.configuration_sane import SaneConfig
from sane_hf.models.sane.modeling_sane import SaneForPropertyPrediction

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


@torch.no_grad()
def predict_properties(
    model: SaneForPropertyPrediction,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Properties predicted by ``model`` in their units, by name (the labels' standardization
    must be in its config: `LabelStandardization.save_to`)."""
    standardization = LabelStandardization.from_config(model.config)
    if standardization is None:
        raise ValueError(
            "config has no property_names/property_mean/property_std: record the labels' "
            "standardization with LabelStandardization.save_to(model.config) before saving"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    output = model(tokens.to(device, model.dtype), positions.to(device), attention_mask)
    model.train(was_training)
    values = standardization.to_units(output.predictions)
    return {name: values[:, index] for index, name in enumerate(standardization.names)}


__all__ = ["LabelStandardization", "predict_properties", "with_labels"]
