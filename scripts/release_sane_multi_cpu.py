"""Release the universal SANE of the multi-architecture suite as ``checkpoints/sane-multi-cpu``.

    python -m benchmarks.reproduce.multiarch_suite --stage evaluate   # numbers first
    python scripts/release_sane_multi_cpu.py

Copies the model (config, weights, remote code), its `SaneUniversalProcessor` config and the
probe heads fitted by ``sane-hf pretrain`` from the run folder, and writes the card with the
suite's numbers from ``benchmarks/results/multiarch_suite.json``. Nothing fitted on a zoo
travels along: no statistics, no layout of one architecture, no alignment reference (the
script refuses to release a folder holding one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "outputs" / "reproduce" / "multiarch" / "sane_fan_in"
RELEASE = ROOT / "checkpoints" / "sane-multi-cpu"
RESULTS = ROOT / "benchmarks" / "results" / "multiarch_suite.json"
FILES = (
    "config.json",
    "model.safetensors",
    "configuration_sane.py",
    "modeling_sane.py",
    "preprocessor_config.json",
    "probe_heads.json",
    "probe_heads.safetensors",
)
ZOO_FITTED = ("sane_zoo.json", "alignment_reference.safetensors")


def card(results: dict) -> str:
    probes = {row["features"]: row for row in results["probes"]["universal"]}
    lines = [
        "---",
        "library_name: sane-hf",
        "tags: [weight-space-learning, sane, hyper-representations]",
        "---",
        "# sane-multi-cpu: one SANE for seven small architectures",
        "",
        "A SANE autoencoder pretrained on a mixed zoo of six architectures (MLPs on digits, "
        "MNIST and MNIST-1D, CNN-s and a wider CNN on MNIST, a small ResNet with BatchNorm on "
        "digits), in universal tokens: 64-value dense tokens, weights divided by a fan-in power "
        "of two, (relative depth, layer type, token in layer) positions. Its processor holds no "
        "statistics and no reference network: it reads any network of Linear, Conv1d/2d, "
        "BatchNorm, LayerNorm and Embedding layers.",
        "",
        "```python",
        "import sane_hf",
        "from sane_hf import SaneModel, SaneProcessor, build_model",
        'model = SaneModel.from_pretrained("checkpoints/sane-multi-cpu")',
        'processor = SaneProcessor.from_pretrained("checkpoints/sane-multi-cpu")',
        'networks = [build_model("mlp", in_features=64, hidden=[32]), build_model("cnn_s"),',
        '            build_model("resnet_small")]',
        "embeddings = sane_hf.embed(model, processor(networks))  # one space, [3, 64]",
        "```",
        "",
        "## Numbers (test split of the mixed suite; `RESULTS.md` section 6)",
        "",
        "| test accuracy probe | R^2 | Kendall tau |",
        "|---|---|---|",
    ]
    for name, row in probes.items():
        lines.append(f"| {name} | {row['r2']:.3f} | {row['kendall_tau']:.3f} |")
    lines += [
        "",
        'One ridge probe over all architectures; "centred": each architecture\'s training-split '
        "mean subtracted (the architecture is known from the network). At this scale s(W) "
        "predicts accuracy across architectures far better than SANE's embeddings, and the "
        "shipped probe heads (on the mean embedding) are weak: use them as a demonstration, "
        "not as a predictor.",
        "",
        "| architecture | decode(encode) / original accuracy |",
        "|---|---|",
    ]
    for name, row in results["reconstruction"].items():
        held = " (never seen in pretraining)" if row["split"] == "held_out" else ""
        lines.append(
            f"| {name}{held} | {row['reconstructed_accuracy']:.3f} / "
            f"{row['original_accuracy']:.3f} ({100 * row['ratio']:.1f}%) |"
        )
    lines += [
        "",
        "CPU scale: 16 networks per architecture (8 for the held-out one), 1,200 pretraining "
        "steps of a 2+2-block, d_model 128 SANE. Reproduce with "
        "`python -m benchmarks.reproduce.multiarch_suite`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    found = [name for name in ZOO_FITTED if (RUN / name).exists()]
    if found:
        raise SystemExit(f"{RUN} holds zoo-fitted files {found}: not a universal SANE")
    RELEASE.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(RUN / name, RELEASE / name)
    results = json.loads(RESULTS.read_text())
    (RELEASE / "README.md").write_text(card(results))
    print(f"released {RELEASE}: {sorted(p.name for p in RELEASE.iterdir())}")


if __name__ == "__main__":
    main()
