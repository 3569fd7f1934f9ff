"""One SANE for many architectures: a mixed zoo suite a 2-core CPU trains in minutes.

    python -m benchmarks.reproduce.multiarch_suite --stage zoos      # train every zoo (resumes)

Six architectures go into pretraining (MLPs of two depths/widths on digits and MNIST, CNN-s and
a wider CNN on MNIST, the MNIST-1D MLP, a small ResNet on digits); a seventh (a deeper MLP of
new widths on digits) is held out of pretraining entirely. The zoos also differ in how their
networks are made, as users' networks do: zero biases (``uniform``/``normal``/``kaiming``
inits) and PyTorch's own non-zero biases (``default``), inputs standardized and in ``[0, 1]``,
Adam and SGD. Work folders: ``outputs/reproduce/multiarch/<zoo>/``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from benchmarks.common import WORK_ROOT
from sane_hf import ZooConfig
from sane_hf.recipes.experiments import zoo_stage

WORK = WORK_ROOT / "multiarch"


@dataclass(frozen=True)
class MixedZoo:
    """One architecture of the suite and whether pretraining sees it."""

    zoo: ZooConfig
    held_out: bool = False


def _zoo(
    architecture,
    kwargs,
    dataset,
    activation,
    init,
    optimizer,
    lr,
    epochs,
    *,
    standardize=True,
    input_shape=None,
    models=16,
    seed=0,
) -> ZooConfig:
    return ZooConfig(
        architecture=architecture,
        architecture_kwargs=kwargs,
        dataset=dataset,
        dataset_kwargs={"standardize": standardize},
        input_shape=input_shape,
        num_models=models,
        seed=seed,
        epochs=epochs,
        models_per_chunk=models,
        hyperparameters={
            "activation": activation,
            "dropout": 0.0,
            "init": init,
            "optimizer": optimizer,
            "lr": lr,
            "weight_decay": 0.0,
        },
    )


ZOOS: dict[str, MixedZoo] = {
    "digits_mlp": MixedZoo(_zoo("mlp", {"hidden": [32]}, "digits", "tanh", "uniform",
                                "adam", 1e-3, 6)),
    "mnist_mlp": MixedZoo(_zoo("mlp", {"hidden": [24, 24]}, "mnist", "relu", "default",
                               "sgd", 1e-2, 4, standardize=False, input_shape=(1, 14, 14))),
    "mnist_cnn_s": MixedZoo(_zoo("cnn_s", {}, "mnist", "tanh", "default", "adam", 1e-3, 4)),
    "mnist_cnn_wide": MixedZoo(_zoo("cnn_wide", {}, "mnist", "relu", "kaiming_uniform",
                                    "sgd", 1e-2, 4, standardize=False)),
    "mnist1d_mlp": MixedZoo(_zoo("mlp", {"hidden": [64]}, "mnist1d", "gelu", "normal",
                                 "adam", 1e-3, 6)),
    "digits_resnet": MixedZoo(_zoo("resnet_small", {}, "digits", "relu", "default",
                                   "adam", 1e-3, 4, standardize=False)),
    "digits_mlp_deep": MixedZoo(_zoo("mlp", {"hidden": [48, 24]}, "digits", "tanh", "default",
                                     "sgd", 3e-2, 6, standardize=False, models=8, seed=100),
                                held_out=True),
}  # fmt: skip


def train_zoos() -> None:
    for name, entry in ZOOS.items():
        print(f"== {name}: {entry.zoo.num_models} x {entry.zoo.architecture}", flush=True)
        zoo_stage(entry.zoo, WORK / name / "zoo", WORK / name / "zoo_accuracy.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("zoos",), required=True)
    args = parser.parse_args()
    if args.stage == "zoos":
        train_zoos()


if __name__ == "__main__":
    main()
