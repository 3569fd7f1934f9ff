"""One SANE for many architectures: a mixed zoo suite a 2-core CPU trains in minutes.

    python -m benchmarks.reproduce.multiarch_suite --stage zoos      # train every zoo (resumes)
    python -m benchmarks.reproduce.multiarch_suite --stage datasets  # mixed + held-out + per-arch
    sane-hf pretrain --config multi-cpu --dataset outputs/reproduce/multiarch/mixed \
        --output-dir outputs/reproduce/multiarch/sane_fan_in
    python -m benchmarks.reproduce.multiarch_suite --stage per-arch  # same compute, split up
    python -m benchmarks.reproduce.multiarch_suite --stage evaluate  # probes, reconstructions

Six architectures go into pretraining (MLPs of two depths/widths on digits and MNIST, CNN-s and
a wider CNN on MNIST, the MNIST-1D MLP, a small ResNet on digits); a seventh (a deeper MLP of
new widths on digits) is held out of pretraining entirely. The zoos also differ in how their
networks are made, as users' networks do: zero biases (``uniform``/``normal``/``kaiming``
inits) and PyTorch's own non-zero biases (``default``), inputs standardized and in ``[0, 1]``,
Adam and SGD. Work folders: ``outputs/reproduce/multiarch/<zoo>/``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, WORK_ROOT, machine_info, update_results_file
from sane_hf import ZooConfig
from sane_hf.downstream.embedding import embed
from sane_hf.downstream.mixed import reconstruction_accuracies, sample_from_prompts
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import train_sane
from sane_hf.recipes.experiments import zoo_stage
from sane_hf.recipes.multiarch import mixed_probe_table, probe_mixed_pretrained
from sane_hf.weights.universal import TokenScheme
from sane_hf.zoo.mixed import (
    build_mixed_dataset,
    is_mixed_dataset,
    load_mixed_dataset,
    save_mixed_dataset,
)

WORK = WORK_ROOT / "multiarch"
RESULTS_FILE = RESULTS_DIR / "multiarch_suite.json"
SCHEME = TokenScheme(tokensize=64, token_mode="dense", scale="fan_in")
UNIVERSAL = WORK / "sane_fan_in"  # the multi-cpu preset's 1,200 steps on the mixed zoo
UNIVERSAL_STEPS = 1200
BANDWIDTH = 0.5  # KDE bandwidth in units of the prompts' latent spread (fixed, not tuned)


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


def _zoo_dirs(names) -> list[Path]:
    return [WORK / name / "zoo" for name in names]


def pretrained_names() -> list[str]:
    return [name for name, entry in ZOOS.items() if not entry.held_out]


def build_datasets() -> None:
    """The mixed zoo of the pretrained architectures, the held-out architecture alone, and one
    dataset per architecture for the per-architecture SANEs (all in the same scheme); datasets
    already built are kept."""
    names = pretrained_names()
    held_out = [name for name in ZOOS if ZOOS[name].held_out]
    wanted = {WORK / "mixed": names, WORK / "held_out": held_out}
    wanted.update({WORK / name / "universal": [name] for name in names})
    for output, zoo_names in wanted.items():
        if not is_mixed_dataset(output):
            dataset = build_mixed_dataset(_zoo_dirs(zoo_names), SCHEME, names=zoo_names)
            save_mixed_dataset(dataset, output)


def train_per_architecture() -> None:
    """One SANE per architecture, the universal SANE's steps shared out equally."""
    steps = UNIVERSAL_STEPS // len(pretrained_names())
    for name in pretrained_names():
        output = WORK / name / "sane"
        if (output / "model.safetensors").is_file():
            continue
        config = PretrainingConfig.load(
            "multi-cpu",
            flags={"dataset": str(WORK / name / "universal"), "output_dir": str(output),
                   "max_steps": steps},
        )  # fmt: skip
        train_sane(config)


def evaluate() -> dict:
    """Probes over the mixed test split, decode(encode) per architecture and held out."""
    mixed, held_out = load_mixed_dataset(WORK / "mixed"), load_mixed_dataset(WORK / "held_out")
    per_architecture = {
        name: WORK / name / "sane"
        for name in pretrained_names()
        if (WORK / name / "sane" / "model.safetensors").is_file()
    }
    probes = probe_mixed_pretrained(UNIVERSAL, mixed, per_architecture_models=per_architecture)
    print(mixed_probe_table(probes))
    model = SaneModel.from_pretrained(UNIVERSAL).eval()
    last = lambda split: split.filter(  # noqa: E731  the networks of each model's last epoch
        lambda epoch, name: epoch == max(ZOOS[name].zoo.resolved_checkpoint_epochs),
        input_columns=["epoch", "architecture"],
    )
    reconstruction = {}
    for label, rows, metadata in (
        ("test", last(mixed.splits["test"]), mixed.metadata),
        ("held_out", last(held_out.splits["test"]), held_out.metadata),
    ):
        for name, scores in reconstruction_accuracies(model, rows, metadata).items():
            original, decoded = np.mean(scores["original"]), np.mean(scores["reconstructed"])
            reconstruction[name] = {
                "split": label,
                "networks": len(scores["original"]),
                "original_accuracy": float(original),
                "reconstructed_accuracy": float(decoded),
                "ratio": float(decoded / original),
            }
            print(f"{name:>16} ({label}): decode(encode) {decoded:.3f} vs {original:.3f}")
    sampling = {}
    for label, rows, metadata in (
        ("test", last(mixed.splits["test"]), mixed.metadata),
        ("held_out", last(held_out.splits["test"]), held_out.metadata),
    ):
        for name, groups in sample_from_prompts(model, rows, metadata, bandwidth=BANDWIDTH).items():
            sampling[name] = {"split": label, **{g: float(np.mean(v)) for g, v in groups.items()}}
            print(f"{name:>16} ({label}): " + ", ".join(
                f"{g} {np.mean(v):.3f}" for g, v in groups.items()))  # fmt: skip
    held_embeddings = embed(model, held_out.splits["test"], progress=False)
    results = {
        "scheme": SCHEME.to_dict(),
        "probes": probes,
        "reconstruction": reconstruction,
        "sampling": {"bandwidth": BANDWIDTH, "epoch0_test_accuracy": sampling},
        "held_out_embedded": bool(torch.isfinite(held_embeddings.mean).all()),
        "machine": machine_info(torch.device("cpu")),
    }
    update_results_file(RESULTS_FILE, lambda data: data.update(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", choices=("zoos", "datasets", "per-arch", "evaluate"), required=True
    )
    args = parser.parse_args()
    if args.stage == "zoos":
        train_zoos()
    elif args.stage == "datasets":
        build_datasets()
    elif args.stage == "per-arch":
        train_per_architecture()
    else:
        print(json.dumps(evaluate()["reconstruction"], indent=1))


if __name__ == "__main__":
    main()
