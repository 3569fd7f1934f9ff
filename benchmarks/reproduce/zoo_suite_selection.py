"""The zoo suite's recipe and sampling choices, made on validation splits only.

    python -m benchmarks.reproduce.zoo_suite_selection --ceilings              # every zoo
    python -m benchmarks.reproduce.zoo_suite_selection --zoo mnist_cnn_s_relu_kaiming --candidate d128
    python -m benchmarks.reproduce.zoo_suite_selection --zoo digits_mlp_tanh_uniform --candidate d256-l256 --sampling
    python -m benchmarks.reproduce.zoo_suite_selection --markdown

Three kinds of measurement, each written into ``benchmarks/results/zoo_suite_selection.json``:

- ``--ceilings``: how much of a zoo's validation weights a *linear* per-token code of width k
  (PCA fitted on the training tokens) reconstructs, and how much a linear code of the training
  networks (whole-network PCA) does. Early-epoch networks are mostly their random
  initialization, which no model of the training networks predicts (whole-network PCA explains
  little), so every token has to pass its own values through SANE's narrowest per-token width:
  the token embedding ``Linear(T -> d_model)``. The validation split only: a diagnosis of the
  zoos, used for the held-out zoos too without looking at their test splits.
- ``--candidate``: pretrains one candidate recipe on a development zoo (resumable) and scores
  it on that zoo's validation split: reconstruction R^2 and validation R^2 of the linear probes
  (SANE's mean embedding and its per-layer means, next to s(W)).
- ``--sampling``: with the chosen recipe, draws samples around validation-split prompts with
  every sampling kind and KDE mode and compares their epoch-0 accuracy with prompts plus noise
  at the same distance from the training checkpoints.

Only the development zoos of `benchmarks.reproduce.zoo_suite` run candidates and sampling
choices; their datasets are the suite's own (run the suite's zoo first, or ``--zoo`` builds it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from benchmarks.common import (
    CPU_PRETRAINING,
    RESULTS_DIR,
    WORK_ROOT,
    machine_info,
    update_results_file,
)
from benchmarks.reproduce.zoo_suite import SAMPLING, ZOOS, autoencode_settings
from sane_hf.downstream.features import (
    HEAD_FEATURE_SETS,
    SANE_AND_WEIGHT_STATISTICS,
    SANE_ONLY_FEATURE_SETS,
)
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.experiments import (
    build_dataset_stage,
    pretrain_stage,
    probe_stage,
    r2_table,
    zoo_stage,
)
from sane_hf.recipes.sampling import compare_sampling
from sane_hf.recipes.settings import SamplingMethod
from sane_hf.zoo.metadata import ZooDataset

SELECTION_FILE = RESULTS_DIR / "zoo_suite_selection.json"
# Candidate recipes: changes to the cpu-scale recipe as it was before the suite (cnn-s-cpu,
# 1,500 steps). Width first: the per-token ceilings say the token embedding is the bottleneck.
# The `cpu` preset's changes (d_model and latent 256, 2+2 blocks, bf16); later candidates vary it.
_CPU = {"model": {"d_model": 256, "latent_dim": 256, "n_layers": 2}, "mixed_precision": "bf16"}
CANDIDATES: dict[str, dict[str, Any]] = {
    "cnn-s-cpu": {},
    "d128-fp32": {"model": {"d_model": 128}},
    "d128": {"model": {"d_model": 128}, "mixed_precision": "bf16"},
    "d256-l256": {"model": {"d_model": 256, "latent_dim": 256}, "mixed_precision": "bf16"},
    "d256-l256-2+2": _CPU,
    "d256-l256-2+2-noise0.05": {**_CPU, "noise_sigma": 0.05},
    # for full tokens (mnist_mlp_tanh_uniform): a token embedding wider than the token (289)
    "d384-l384-2+2": {
        "model": {"d_model": 384, "latent_dim": 384, "n_layers": 2, "n_heads": 6},
        "mixed_precision": "bf16",
    },
    # the cpu preset overfits full tokens (train MSE 0.02 against 0.16 on validation): dropout,
    # stronger augmentation, decoupled weight decay on the matrices (the preset's is 3e-9)
    "d256-l256-2+2-dropout0.1": {**_CPU, "model": {**_CPU["model"], "dropout": 0.1}},
    "d256-l256-2+2-noise0.2": {**_CPU, "noise_sigma": 0.2},
    "d256-l256-2+2-wd1": {**_CPU, "weight_decay": 1.0},
    "d256-l256-2+2-wd3": {**_CPU, "weight_decay": 3.0},
}
CEILING_WIDTHS = (32, 64, 128, 192, 256)
SAMPLING_MODES = ("token", "joint", "shared")
SAMPLING_BANDWIDTHS = (0.1, 0.2, 0.4)


def candidate_values(name: str) -> dict[str, Any]:
    """The full pretraining values of a candidate: the suite's base recipe plus its changes."""
    changes = CANDIDATES[name]
    values = {**CPU_PRETRAINING, "max_steps": 1500, **changes}
    values["model"] = {**CPU_PRETRAINING["model"], **changes.get("model", {})}
    return values


def _split_arrays(split: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``[M, N, T]`` and the mask of their real values."""
    rows = split.with_format("numpy", columns=["tokens", "counts"])
    tokens = np.stack(list(rows["tokens"])).astype(np.float64)
    counts = np.stack(list(rows["counts"]))
    return tokens, np.arange(tokens.shape[-1]) < counts[..., None]


def _r2(reconstruction: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> float:
    """R^2 over the real values, as pretraining's ``val_r2`` counts it."""
    values = tokens[mask]
    residual = np.square(reconstruction[mask] - values).sum()
    return float(1 - residual / np.square(values - values.mean()).sum())


def linear_ceilings(dataset_dir: Path) -> dict[str, Any]:
    """Validation R^2 of per-token PCA codes of width k and of whole-network PCA (train fit)."""
    splits = datasets.load_from_disk(str(dataset_dir))
    train, _ = _split_arrays(splits["train"])
    val, mask = _split_arrays(splits["validation"])
    tokensize = train.shape[-1]
    flat_train, flat_val = train.reshape(-1, tokensize), val.reshape(-1, tokensize)
    mean = flat_train.mean(0)
    _, _, components = np.linalg.svd(flat_train - mean, full_matrices=False)
    token_pca = {}
    for width in CEILING_WIDTHS:
        basis = components[:width]
        reconstruction = (flat_val - mean) @ basis.T @ basis + mean
        token_pca[str(width)] = round(_r2(reconstruction.reshape(val.shape), val, mask), 4)
    networks_train, networks_val = train.reshape(len(train), -1), val.reshape(len(val), -1)
    network_mean = networks_train.mean(0)
    _, _, network_basis = np.linalg.svd(networks_train - network_mean, full_matrices=False)
    projected = (networks_val - network_mean) @ network_basis.T @ network_basis + network_mean
    return {
        "tokens_per_network": int(train.shape[1]),
        "real_values_per_token": round(float(mask.sum(-1).mean()), 1),
        "training_networks": len(train),
        "token_pca_r2": token_pca,
        "network_pca_r2": round(_r2(projected.reshape(val.shape), val, mask), 4),
        "mean_network_r2": round(_r2(np.broadcast_to(train.mean(0), val.shape), val, mask), 4),
    }


def _suite_dataset(name: str, work_root: Path) -> tuple[ZooDataset, Path]:
    """The suite zoo's dataset (built and cached by the suite's own stages)."""
    suite_zoo, work = ZOOS[name], work_root / "zoo_suite" / name
    zoo_stage(suite_zoo.zoo, work / "zoo", work / "zoo_accuracy.png")
    return build_dataset_stage(
        work / "zoo", work / "dataset", epochs=range(1, suite_zoo.pretrain_epochs + 1)
    ), work / "dataset"


def _check_development(name: str) -> None:
    if not ZOOS[name].development:
        raise SystemExit(f"{name} is a held-out zoo: recipes are chosen on development zoos only")


def _candidate_model(zoo_name: str, candidate: str, work_root: Path):
    """A development zoo's dataset, the candidate's run folder and its SANE (pretrained there
    first, or resumed, or loaded when finished)."""
    _check_development(zoo_name)
    zoo, dataset_dir = _suite_dataset(zoo_name, work_root)
    output_dir = work_root / "zoo_suite_selection" / zoo_name / candidate
    config = PretrainingConfig.load(
        candidate_values(candidate),
        flags={"dataset": str(dataset_dir), "output_dir": str(output_dir)},
    )
    return zoo, output_dir, pretrain_stage(config)


def run_candidate(zoo_name: str, candidate: str, work_root: Path) -> dict[str, Any]:
    """Pretrain one candidate on a development zoo and score it on the validation split."""
    started = time.perf_counter()
    zoo, output_dir, model = _candidate_model(zoo_name, candidate, work_root)
    summary = json.loads((output_dir / SUMMARY_FILE).read_text())
    report = probe_stage(model, zoo, output_dir, name="probe", feature_sets=HEAD_FEATURE_SETS)
    return {
        "recipe": candidate_values(candidate),
        "val_r2": summary.get("val_r2"),
        "decode_encode_of_validation_prompts": _autoencoded_share(model, zoo),
        "steps_per_second": summary.get("steps_per_second"),
        "probe_validation_r2": r2_table(report.to_dict(), "validation_score"),
        "command": f"python -m benchmarks.reproduce.zoo_suite_selection --zoo {zoo_name} "
        f"--candidate {candidate}",
        "wall_time_s (this run)": round(time.perf_counter() - started, 1),
        "machine": machine_info(model.device),
    }


def _autoencoded_share(model, zoo: ZooDataset) -> float:
    """Epoch-0 accuracy of decode(encode(prompt)) over the validation prompts' own accuracy."""
    kde = SamplingMethod("kde")
    settings = autoencode_settings("validation")
    accuracy = compare_sampling(model, zoo, [kde], settings, include_prompts=True).evaluation
    return float(
        accuracy.accuracy[kde.name][:, 0].mean() / accuracy.accuracy["prompts"][:, 0].mean()
    )


def run_sampling(zoo_name: str, candidate: str, work_root: Path) -> dict[str, Any]:
    """Every sampling kind and KDE mode around validation prompts: epoch-0 accuracy, matched
    noise and novelty, so the default is the one that beats prompts + noise by the most."""
    zoo, _, model = _candidate_model(zoo_name, candidate, work_root)
    methods = [
        SamplingMethod(kind, mode) for kind in ("kde", "subsampled") for mode in SAMPLING_MODES
    ]
    by_method, prompts = {}, None
    for bandwidth in SAMPLING_BANDWIDTHS:
        settings = dataclasses.replace(
            SAMPLING,
            prompt_split="validation",
            bandwidth=bandwidth,
            finetune_epochs=0,
            noise_levels=[],
        )
        results = compare_sampling(model, zoo, methods, settings, include_prompts=True)
        print(f"bandwidth {bandwidth}:\n{results.table()}")
        evaluation = results.evaluation
        prompts = float(evaluation.accuracy["prompts"][:, 0].mean())
        for method in methods:
            accuracy = float(evaluation.accuracy[method.name][:, 0].mean())
            noise = float(evaluation.accuracy[evaluation.matched[method.name]][:, 0].mean())
            by_method[f"{method.name}, bandwidth {bandwidth}"] = {
                "epoch0_acc": accuracy,
                "of_prompts": accuracy / prompts,
                "matched_noise_epoch0_acc": noise,
                "over_matched_noise": accuracy - noise,
                "novelty": evaluation.novelty_medians(method.name),
            }
    best = max(by_method, key=lambda name: by_method[name]["over_matched_noise"])
    return {
        "candidate": candidate,
        "prompt_split": "validation",
        "prompts_epoch0_acc": prompts,
        "methods": by_method,
        "best_over_matched_noise": best,
        "command": f"python -m benchmarks.reproduce.zoo_suite_selection --zoo {zoo_name} "
        f"--sampling --candidate {candidate}",
    }


def update(section: str, key: str, entry: dict[str, Any]) -> None:
    """Replace one entry of the selection file, keeping the rest (runs may go in parallel)."""
    update_results_file(
        SELECTION_FILE, lambda data: data.setdefault(section, {}).__setitem__(key, entry)
    )
    print(f"{section}/{key} written to {SELECTION_FILE}")


def selection_markdown(data: dict[str, Any]) -> str:
    """RESULTS.md's tables: ceilings per zoo and validation scores per candidate."""
    lines = [
        "| zoo | real values / token | token PCA R² at width "
        + " / ".join(str(w) for w in CEILING_WIDTHS)
        + " | whole-network PCA R² |",
        "|---|---|---|---|",
    ]
    for name, entry in data.get("ceilings", {}).items():
        widths = " / ".join(f"{entry['token_pca_r2'][str(w)]:.2f}" for w in CEILING_WIDTHS)
        lines.append(
            f"| {name} | {entry['real_values_per_token']} | {widths} | {entry['network_pca_r2']:.2f} |"
        )
    lines += [
        "",
        "| dev zoo | candidate | val. recon. R² | decode(encode), % of val. prompts | steps/s"
        " | val. probe R² acc best SANE set / SANE + s(W) / s(W) | epoch | ggap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    candidates = data.get("candidates", {})
    order = [f"{zoo}/{name}" for zoo in ZOOS for name in CANDIDATES]
    for key in [key for key in order if key in candidates]:
        entry, (zoo, candidate) = candidates[key], key.split("/")
        probes = entry["probe_validation_r2"]
        cells = [
            " / ".join(
                f"{value:.2f}"
                for value in (
                    max(probes[p].get(f, float("nan")) for f in SANE_ONLY_FEATURE_SETS),
                    probes[p].get(SANE_AND_WEIGHT_STATISTICS, float("nan")),
                    probes[p].get("s(W)", float("nan")),
                )
            )
            for p in ("test_acc", "epoch", "ggap")
        ]
        lines.append(
            f"| {zoo} | {candidate} | {entry['val_r2']:.3f} | "
            f"{100 * entry.get('decode_encode_of_validation_prompts', float('nan')):.1f} | "
            f"{entry['steps_per_second']:.2f} | " + " | ".join(cells) + " |"
        )
    for zoo, entry in data.get("sampling", {}).items():
        lines += [
            "",
            f"{zoo}, {entry['candidate']}, validation prompts at "
            f"{100 * entry['prompts_epoch0_acc']:.1f}%: epoch-0 accuracy % (of prompts) / over "
            "matched noise, points, per KDE bandwidth",
            "",
            "| method | " + " | ".join(f"bandwidth {b}" for b in SAMPLING_BANDWIDTHS) + " |",
            "|---|" + "---|" * len(SAMPLING_BANDWIDTHS),
        ]
        methods = dict.fromkeys(name.rsplit(", bandwidth", 1)[0] for name in entry["methods"])
        for method in methods:
            cells = []
            for bandwidth in SAMPLING_BANDWIDTHS:
                result = entry["methods"][f"{method}, bandwidth {bandwidth}"]
                cells.append(
                    f"{100 * result['epoch0_acc']:.1f} ({result['of_prompts']:.0%}) / "
                    f"{100 * result['over_matched_noise']:+.1f}"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS))
    parser.add_argument("--candidate", choices=sorted(CANDIDATES))
    parser.add_argument("--ceilings", action="store_true", help="linear ceilings of every zoo")
    parser.add_argument("--sampling", action="store_true", help="sampling modes on validation")
    parser.add_argument("--markdown", action="store_true", help="print RESULTS.md's tables")
    parser.add_argument("--work-dir", help="default outputs/reproduce/")
    args = parser.parse_args()
    work_root = Path(args.work_dir) if args.work_dir else WORK_ROOT
    if args.markdown:
        print(selection_markdown(json.loads(SELECTION_FILE.read_text())))
    elif args.ceilings:
        for name in [args.zoo] if args.zoo else ZOOS:
            _, dataset_dir = _suite_dataset(name, work_root)
            update("ceilings", name, linear_ceilings(dataset_dir))
    elif args.zoo and args.candidate and args.sampling:
        update("sampling", args.zoo, run_sampling(args.zoo, args.candidate, work_root))
    elif args.zoo and args.candidate:
        update(
            "candidates",
            f"{args.zoo}/{args.candidate}",
            run_candidate(args.zoo, args.candidate, work_root),
        )
    else:
        parser.error(
            "give --ceilings, --markdown, or --zoo and --candidate (with --sampling: sampling)"
        )


if __name__ == "__main__":
    main()
