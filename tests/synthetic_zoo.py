"""A tiny synthetic zoo dataset for the downstream tests (embedding, probing, sampling).

Checkpoints are small MLPs for 8x8 digits whose weights drift away from their initialization with
the epoch, and whose recorded accuracy grows with the epoch, so properties are really encoded in
the weights (the weight variance grows with the epoch) without training anything.
"""

from pathlib import Path

import torch

from sane_hf import build_model
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.formats import write_checkpoint, write_zoo_info, write_zoo_metadata

ARCHITECTURE_KWARGS = {"in_features": 64, "hidden": [6], "num_classes": 10}  # 8x8 digits
EPOCHS = (0, 1, 2, 3, 4)
TOKENSIZE = 13  # rows of 64 + 1 values -> 5 tokens each; classifier rows of 6 + 1 -> 1 token


def template(activation: str = "tanh") -> torch.nn.Module:
    return build_model("mlp", **ARCHITECTURE_KWARGS, activation=activation)


def write_raw_zoo(root: Path, num_models: int = 20) -> Path:
    zoo = {
        "architecture": "mlp",
        "architecture_kwargs": ARCHITECTURE_KWARGS,
        "dataset": "digits",  # the task the samples are scored and fine-tuned on
        "input_shape": [1, 8, 8],
        "config": {"dataset_kwargs": {"num_samples": 200}},
        "kind": "hyperparameter",
        "epochs": list(EPOCHS),
    }
    write_zoo_info(root, zoo)
    lines = []
    for model in range(num_models):
        activation = ("tanh", "relu")[model % 2]
        torch.manual_seed(model)
        initial = template(activation).state_dict()
        generator = torch.Generator().manual_seed(1000 + model)
        for epoch in EPOCHS:
            drift = {k: torch.randn(v.shape, generator=generator) for k, v in initial.items()}
            state_dict = {k: v + 0.3 * epoch * drift[k] for k, v in initial.items()}
            file = write_checkpoint(root, f"model_{model:04d}", epoch, state_dict)
            test_acc = 0.3 + 0.1 * epoch + 0.01 * (model % 3)
            train_acc = test_acc + 0.02 * epoch
            hyperparameters = {"activation": activation, "init": "uniform", "lr": 1e-3}
            lines.append(
                {"file": file, "model_id": f"model_{model:04d}", "epoch": epoch, "seed": model,
                 "train_loss": 2.0 - 0.3 * epoch, "train_acc": train_acc, "val_loss": None,
                 "val_acc": None, "test_loss": 2.1 - 0.3 * epoch, "test_acc": test_acc,
                 "ggap": train_acc - test_acc, "hyperparameters": hyperparameters}
            )  # fmt: skip
    write_zoo_metadata(root, lines)
    return root


def build_synthetic_zoo(root: Path, num_models: int = 20):
    raw = write_raw_zoo(root / "raw", num_models)
    return build_zoo_dataset(raw, tokensize=TOKENSIZE, align=False, progress=False)
