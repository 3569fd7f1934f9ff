"""A suite of small zoos that a 2-core CPU builds in minutes, fixed before any tuning.

    python -m benchmarks.reproduce.zoo_suite --list
    python -m benchmarks.reproduce.zoo_suite --zoo digits_mlp_tanh_uniform   # one zoo, resumable

Does SANE's cpu-scale recipe hold on zoos it was not tuned on, and do its samples beat the
memorization baselines (prompts + noise at the same distance, averages of two prompts)? The zoos
differ in dataset (digits, MNIST subset, MNIST-1D), architecture, activation and initialization;
``mnist1d_mlp_gelu_normal`` and ``mnist_mlp_relu_kaiming`` have networks of 210 and 106 tokens,
longer than SANE's 48-token window, so pretraining, encoding and decoding take the windowed,
halo path. Only the ``development`` zoos may inform recipe choices, and only through their
validation split (SANE's validation reconstruction R^2, probes fitted on train and scored on
validation); every number written here is a test number or a held-out prompt's. The recipe
(the `cpu` preset) and the default sampling settings were chosen that way:
`benchmarks.reproduce.zoo_suite_selection`.

Every zoo runs the resumable stages of `sane_hf.recipes.experiments` in
``outputs/reproduce/zoo_suite/<zoo>/`` (rerun the command to continue):

1. zoo training; 2. dataset of epochs 1..P; 3. SANE pretraining (``SUITE_PRETRAINING``);
4. probes of SANE's feature sets (mean, per-layer means, s(Z)), SANE + s(W), s(W) and W (test
   R^2 and Kendall tau of accuracy, epoch, generalization gap; SANE's feature set per property
   chosen on validation);
5. the in-distribution signal (`sane_hf.downstream.ood`, reference fitted on train and
   validation): false alarms on the test split's networks (zoo-made, epochs SANE saw), and how
   often it flags the test networks' later epochs, their untrained epoch-0 checkpoints and
   untrained networks of PyTorch's default init;
6. sampling around the test split's best epoch-P networks (unseen by SANE): KDE and subsampled
   samples with the memorization baselines (matched noise, and for subsampling matched noise
   selected the same way), prompts and from-scratch networks, fine-tuned for
   ``finetune_epochs``; and decode(encode(prompt)) (bandwidth 0) at epoch 0.

Each finished zoo updates its entry of ``benchmarks/results/zoo_suite.json`` and writes
``benchmarks/results/zoo_suite_<zoo>_novelty.png`` (accuracy at epoch 0 against novelty: the
noise curve, the ensembles and each SANE method); ``--markdown`` prints RESULTS.md's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    WORK_ROOT,
    default_device,
    machine_info,
    update_results_file,
)
from sane_hf import SaneProcessor, ZooConfig, build_model
from sane_hf.downstream.features import (
    HEAD_FEATURE_SETS,
    SANE_AND_WEIGHT_STATISTICS,
    SANE_ONLY_FEATURE_SETS,
    split_tokens,
)
from sane_hf.downstream.ood import InDistributionReference
from sane_hf.downstream.pretrained import PretrainedSane
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.experiments import (
    StageLog,
    build_dataset_stage,
    experiment_pretraining,
    pretrain_stage,
    probe_stage,
    r2_table,
    zoo_stage,
)
from sane_hf.recipes.sampling import SamplingResults, cached_sampling, compare_sampling
from sane_hf.recipes.settings import SamplingMethod, SamplingSettings
from sane_hf.utils.config import load_values
from sane_hf.zoo.storage import load_zoo_records

SUITE_FILE = RESULTS_DIR / "zoo_suite.json"
KDE, SUBSAMPLED = SamplingMethod("kde"), SamplingMethod("subsampled")

# The `cpu` preset, chosen on the validation splits of the two development zoos
# (`benchmarks.reproduce.zoo_suite_selection`: d_model and latent 256, bf16), capped at 1,500
# steps. The suite's first run used `cnn-s-cpu` (d_model 64, latent 128) fixed before any zoo ran.
SUITE_PRETRAINING: dict[str, Any] = {**load_values("cpu", "pretraining"), "max_steps": 1500}


@dataclass(frozen=True)
class SuiteZoo:
    """One zoo of the suite: what is trained, the epochs SANE sees, and its role."""

    zoo: ZooConfig
    pretrain_epochs: int  # SANE trains on epochs 1..P; prompts are epoch-P test networks
    development: bool  # recipe choices may use this zoo's validation split
    tokens_per_network: int  # > 48: several windows per network


def _seed_zoo(architecture, kwargs, dataset, activation, init, lr, models, epochs) -> ZooConfig:
    hyperparameters = {
        "activation": activation,
        "dropout": 0.0,
        "init": init,
        "optimizer": "adam",
        "lr": lr,
        "weight_decay": 0.0,
    }
    return ZooConfig(
        architecture=architecture,
        architecture_kwargs=kwargs,
        dataset=dataset,
        num_models=models,
        epochs=epochs,
        hyperparameters=hyperparameters,
    )


ZOOS: dict[str, SuiteZoo] = {
    "digits_mlp_tanh_uniform": SuiteZoo(
        _seed_zoo("mlp", {"in_features": 64, "hidden": [32]}, "digits", "tanh", "uniform", 1e-3,
                  models=50, epochs=10),
        pretrain_epochs=5,
        development=True,
        tokens_per_network=42,
    ),
    "mnist_cnn_s_relu_kaiming": SuiteZoo(
        _seed_zoo("cnn_s", {}, "mnist", "relu", "kaiming_uniform", 3e-4, models=50, epochs=8),
        pretrain_epochs=4,
        development=True,
        tokens_per_network=48,
    ),
    # Added after the `cpu` preset's suite run, as a development zoo with full tokens (about 220
    # real values per token, the held-out MNIST MLP's 240, the other development zoos' 51-57), so
    # that a remedy for the MNIST MLP's reconstruction can be chosen on a validation split.
    "mnist_mlp_tanh_uniform": SuiteZoo(
        _seed_zoo("mlp", {"in_features": 784, "hidden": [16]}, "mnist", "tanh", "uniform", 1e-3,
                  models=50, epochs=8),
        pretrain_epochs=4,
        development=True,
        tokens_per_network=58,
    ),
    "mnist1d_mlp_gelu_normal": SuiteZoo(
        _seed_zoo("mlp", {"in_features": 40, "hidden": [100, 100]}, "mnist1d", "gelu", "normal",
                  1e-3, models=50, epochs=10),
        pretrain_epochs=5,
        development=False,
        tokens_per_network=210,
    ),
    "mnist_mlp_relu_kaiming": SuiteZoo(
        _seed_zoo("mlp", {"in_features": 784, "hidden": [32]}, "mnist", "relu", "kaiming_normal",
                  1e-3, models=50, epochs=8),
        pretrain_epochs=4,
        development=False,
        tokens_per_network=106,
    ),
}  # fmt: skip

SAMPLING = SamplingSettings(
    num_prompts=10,
    prompt_split="test",
    num_samples=10,
    num_candidates=25,
    rounds=1,
    finetune_epochs=1,
)


def autoencode_settings(prompt_split: str) -> SamplingSettings:
    """decode(encode(prompt)) for the prompts of a split: KDE at bandwidth 0, no fine-tuning,
    no baselines (the suite scores test prompts, the recipe selection validation prompts)."""
    return dataclasses.replace(
        SAMPLING, prompt_split=prompt_split, bandwidth=0.0, finetune_epochs=0, baselines=False
    )


def epoch0(results: SamplingResults, group: str) -> float:
    """Mean test accuracy of a group before fine-tuning."""
    return float(results.evaluation.accuracy[group][:, 0].mean())


def novelty_figures(results: SamplingResults) -> dict[str, dict[str, float]]:
    """Median distance to the nearest training checkpoint (absolute and relative to the distance
    between prompts) and median mistake IoU, per group built from tokens."""
    return {
        group: results.evaluation.novelty_medians(group) for group in results.evaluation.novelty
    }


def in_distribution_rates(model, zoo, raw_zoo: Path, pretrain_epochs: int) -> dict[str, Any]:
    """Share of networks the in-distribution signal flags, per kind of network: the test
    split's (zoo-made, epochs SANE saw: false alarms), the test models' later epochs, their
    untrained epoch-0 checkpoints (the zoo's init) and untrained default-init networks."""
    reference = InDistributionReference.fit(model, zoo.splits)
    tokens, positions, mask = split_tokens(zoo.splits["test"])
    scores = reference.scores(model, tokens, positions, mask)
    rates = {"test split (epochs SANE saw)": _flag_rate(reference.assess(scores).outside)}
    sane = PretrainedSane(model, SaneProcessor.from_zoo(zoo), None, reference)
    test_models = set(zoo.splits["test"]["model_id"])
    _, records, _ = load_zoo_records(raw_zoo)
    files = {
        epoch: [
            raw_zoo / r["file"]
            for r in records
            if r["model_id"] in test_models and r["epoch"] == epoch
        ]
        for epoch in sorted({r["epoch"] for r in records})
    }
    later = [f for epoch, paths in files.items() if epoch > pretrain_epochs for f in paths]
    info = zoo.metadata.zoo
    torch.manual_seed(0)
    default_init = [
        build_model(info["architecture"], **info.get("architecture_kwargs", {})) for _ in range(10)
    ]
    groups = {
        f"test models, later epochs ({pretrain_epochs + 1}..)": later,
        "test models, epoch 0 (untrained, zoo init)": files.get(0, []),
        "untrained, PyTorch default init": default_init,
    }
    for group, networks in groups.items():
        if networks:
            outside = sane.embed(networks).extras["outside_zoo_range"]
            rates[group] = _flag_rate(outside)
    return rates


def _flag_rate(outside: np.ndarray) -> dict[str, float]:
    return {
        "flagged": int(np.sum(outside)),
        "networks": len(outside),
        "rate": float(np.mean(outside)),
    }


def run_zoo(name: str, work_root: Path) -> dict[str, Any]:
    suite_zoo, work = ZOOS[name], work_root / name
    work.mkdir(parents=True, exist_ok=True)
    log = StageLog(num_stages=6, record=work / "stage_times.json")
    started = time.perf_counter()
    with log.stage("zoo", f"training {suite_zoo.zoo.num_models} networks (resumes)"):
        zoo_stage(suite_zoo.zoo, work / "zoo", work / "zoo_accuracy.png")
    with log.stage("dataset", f"zoo dataset of epochs 1..{suite_zoo.pretrain_epochs}"):
        zoo = build_dataset_stage(
            work / "zoo", work / "dataset", epochs=range(1, suite_zoo.pretrain_epochs + 1)
        )
    with log.stage("pretraining", f"pretraining SANE ({SUITE_PRETRAINING['model']})"):
        model = pretrain_stage(experiment_pretraining(SUITE_PRETRAINING, work))
        model = model.to(default_device())
    with log.stage("probing", "SANE's feature sets vs s(W) vs W, test R^2 and Kendall tau"):
        report = probe_stage(model, zoo, work, name="probe", feature_sets=HEAD_FEATURE_SETS)
        print(report.table())
    with log.stage("in-distribution", "flag rates of the in-distribution signal"):
        in_distribution = in_distribution_rates(model, zoo, work / "zoo", suite_zoo.pretrain_epochs)
        print(json.dumps(in_distribution, indent=1))
    with log.stage("sampling", "samples, memorization baselines, prompts, from scratch"):
        sampling = cached_sampling(
            work / "sampling.json",
            lambda: compare_sampling(model, zoo, [KDE, SUBSAMPLED], SAMPLING, include_prompts=True),
        )
        print(sampling.table())
        sampling.evaluation.plot_novelty(RESULTS_DIR / f"zoo_suite_{name}_novelty.png")
        autoencoded = cached_sampling(
            work / "bandwidth0.json",
            lambda: compare_sampling(
                model,
                zoo,
                [KDE],
                autoencode_settings("test"),
            ),
        )
    pretraining = json.loads((work / "sane" / SUMMARY_FILE).read_text())
    matched = sampling.evaluation.matched[SUBSAMPLED.name]
    return {
        "name": name,
        "development_zoo": suite_zoo.development,
        "zoo": suite_zoo.zoo.to_dict(),
        "tokens_per_network": suite_zoo.tokens_per_network,
        "pretrain_epochs": [1, suite_zoo.pretrain_epochs],
        "pretraining_recipe": SUITE_PRETRAINING,
        "reconstruction_r2": pretraining.get("val_r2"),
        "prompts_acc": epoch0(sampling, "prompts"),
        "autoencoded_prompts_acc": epoch0(autoencoded, KDE.name),
        "kde_epoch0_acc": epoch0(sampling, KDE.name),
        "subsampled_epoch0_acc": epoch0(sampling, SUBSAMPLED.name),
        "noise_baseline_epoch0_acc": epoch0(sampling, matched),
        "selected_noise_epoch0_acc": epoch0(
            sampling, sampling.evaluation.selected[SUBSAMPLED.name]
        ),
        "noise_baseline_kde_epoch0_acc": epoch0(sampling, sampling.evaluation.matched[KDE.name]),
        "ensemble_epoch0_acc": epoch0(sampling, "ensemble of 2 prompts"),
        "from_scratch_epoch0_acc": epoch0(sampling, "from scratch"),
        "accuracy_after_finetuning": {
            group: float(values[:, -1].mean())
            for group, values in sampling.evaluation.accuracy.items()
        },
        "probes": r2_table(report.to_dict()),
        "probes_validation": r2_table(report.to_dict(), "validation_score"),
        "probes_kendall_tau": r2_table(report.to_dict(), "kendall_tau"),
        "in_distribution_flag_rates": in_distribution,
        "pretraining_steps_per_second": pretraining.get("steps_per_second"),
        "novelty": novelty_figures(sampling),
        "prompt_distance_scale": sampling.evaluation.scale,
        "sampling_settings": dataclasses.asdict(SAMPLING),
        "command": f"python -m benchmarks.reproduce.zoo_suite --zoo {name}",
        "wall_time_s": {
            "stages (all runs)": log.seconds,
            "this run": round(time.perf_counter() - started, 1),
        },
        "machine": machine_info(default_device()),
    }


def save_entry(entry: dict[str, Any], path: Path = SUITE_FILE) -> None:
    """Replace this zoo's entry of the suite file, keeping the others (zoos may run in parallel)."""
    update_results_file(
        path, lambda suite: suite.setdefault("zoos", {}).__setitem__(entry["name"], entry)
    )
    print(f"\n{entry['name']} written to {path}")


def _share(value: float, prompts: float) -> str:
    return f"{100 * value:.1f} ({value / prompts:.0%})"


def suite_markdown(suite: dict[str, Any]) -> str:
    """RESULTS.md's generation table of the suite file: accuracy at epoch 0, shares of the
    prompts' accuracy, the memorization baselines and novelty."""
    header = [
        "zoo", "tokens", "val. recon. R²", "prompts %", "decode(encode) % (of prompts)",
        "subsampled % (of prompts)", "matched noise %", "matched noise selected like subsampled %",
        "KDE / its noise %", "ensemble %", "subsampled novelty rel. / IoU",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in suite["zoos"].items():
        prompts = entry["prompts_acc"]
        novelty = entry["novelty"].get(SUBSAMPLED.name, {})
        selected = entry.get("selected_noise_epoch0_acc")
        cells = [
            name + (" (dev)" if entry["development_zoo"] else ""),
            entry["tokens_per_network"],
            f"{entry['reconstruction_r2']:.3f}",
            f"{100 * prompts:.1f}",
            _share(entry["autoencoded_prompts_acc"], prompts),
            _share(entry["subsampled_epoch0_acc"], prompts),
            _share(entry["noise_baseline_epoch0_acc"], prompts),
            "-" if selected is None else _share(selected, prompts),
            f"{100 * entry['kde_epoch0_acc']:.1f} / {100 * entry['noise_baseline_kde_epoch0_acc']:.1f}",
            f"{100 * entry['ensemble_epoch0_acc']:.1f}",
            f"{novelty.get('relative', float('nan')):.2f} / {novelty.get('iou', float('nan')):.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _best_sane(entry: dict[str, Any], prop: str) -> str:
    """The SANE-only feature set whose probe scored highest on the **validation** split (the
    test split never picks the feature set)."""
    scores = entry["probes_validation"][prop]
    return max(SANE_ONLY_FEATURE_SETS, key=lambda name: scores.get(name, -np.inf))


def probes_markdown(suite: dict[str, Any]) -> str:
    """RESULTS.md's probe table: test R² / Kendall tau per property of SANE's validation-chosen
    feature set, SANE + s(W) (its own row: not SANE alone), s(W) and W; every SANE set's R²."""
    header = [
        "zoo", "property", "SANE, set chosen on validation: R² / τ", "SANE + s(W) R² / τ",
        "s(W) R² / τ", "W R² / τ", "R² SANE / SANE layers / s(Z)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in suite["zoos"].items():
        for prop in ("test_acc", "epoch", "ggap"):
            r2, tau = entry["probes"][prop], entry.get("probes_kendall_tau", {}).get(prop, {})

            def cell(features: str, r2=r2, tau=tau) -> str:
                if features not in r2:
                    return "-"
                return f"{r2[features]:.3f} / {tau.get(features, float('nan')):.3f}"

            best = _best_sane(entry, prop)
            sane_sets = " / ".join(
                f"{r2[f]:.3f}" if f in r2 else "-" for f in SANE_ONLY_FEATURE_SETS
            )
            cells = [
                name, prop, f"{cell(best)} ({best})", cell(SANE_AND_WEIGHT_STATISTICS),
                cell("s(W)"), cell("W"), sane_sets,
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# an entry of an earlier run of the suite, before this figure was measured
NOT_MEASURED = "not measured (earlier run)"


def _verdict(met: bool, measured: str) -> str:
    return f"met ({measured})" if met else f"**missed** ({measured})"


def targets_markdown(suite: dict[str, Any]) -> str:
    """RESULTS.md's table of the targets per zoo: met or missed, with the numbers."""
    header = [
        "zoo", "recon. R² >= 0.9", "decode(encode) >= 95% of prompts",
        "subsampled >= 85% of prompts", "subsampled > selection-matched noise",
        "acc: best SANE >= W and >= s(W) - 0.02", "epoch: best SANE >= W and >= s(W) - 0.02",
        "acc: SANE + s(W) >= s(W) + 0.02",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in suite["zoos"].items():
        prompts, recon = entry["prompts_acc"], entry["reconstruction_r2"]
        autoencoded = entry["autoencoded_prompts_acc"] / prompts
        subsampled = entry["subsampled_epoch0_acc"] / prompts
        selected = entry.get("selected_noise_epoch0_acc")
        cells = [
            _verdict(recon >= 0.9, f"{recon:.2f}"),
            _verdict(autoencoded >= 0.95, f"{autoencoded:.1%}"),
            _verdict(subsampled >= 0.85, f"{subsampled:.1%}"),
            NOT_MEASURED
            if selected is None
            else _verdict(
                entry["subsampled_epoch0_acc"] > selected,
                f"{100 * entry['subsampled_epoch0_acc']:.1f} vs {100 * selected:.1f}",
            ),
        ]
        for prop in ("test_acc", "epoch"):
            r2, best = entry["probes"][prop], _best_sane(entry, prop)
            weights = r2.get("W", -np.inf)
            cells.append(
                _verdict(
                    r2[best] >= weights and r2[best] >= r2["s(W)"] - 0.02,
                    f"{best} {r2[best]:.3f} vs W {weights:.3f}, s(W) {r2['s(W)']:.3f}",
                )
            )
        acc = entry["probes"]["test_acc"]
        combined = acc.get(SANE_AND_WEIGHT_STATISTICS)
        cells.append(
            NOT_MEASURED
            if combined is None
            else _verdict(combined >= acc["s(W)"] + 0.02, f"{combined:.3f} vs {acc['s(W)']:.3f}")
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def in_distribution_markdown(suite: dict[str, Any]) -> str:
    """RESULTS.md's table of the in-distribution signal's flag rates per zoo and network kind."""
    kinds = list(
        dict.fromkeys(
            kind
            for entry in suite["zoos"].values()
            for kind in entry.get("in_distribution_flag_rates", {})
        )
    )
    lines = ["| zoo | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for name, entry in suite["zoos"].items():
        rates = entry.get("in_distribution_flag_rates")
        if not rates:
            continue
        cells = [
            f"{rates[k]['flagged']} / {rates[k]['networks']}" if k in rates else "-" for k in kinds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS), help="the zoo to build and evaluate")
    parser.add_argument("--list", action="store_true", help="list the zoos and exit")
    parser.add_argument("--work-dir", help="default outputs/reproduce/zoo_suite/")
    parser.add_argument(
        "--markdown", action="store_true", help="print the results table of the suite file"
    )
    args = parser.parse_args()
    if args.markdown:
        suite = json.loads(SUITE_FILE.read_text())
        tables = (suite_markdown, probes_markdown, targets_markdown, in_distribution_markdown)
        print("\n\n".join(table(suite) for table in tables))
        return
    if args.list or not args.zoo:
        for name, suite_zoo in ZOOS.items():
            role = "development" if suite_zoo.development else "held out"
            print(f"{name:<28} {role:<12} {suite_zoo.tokens_per_network:>4} tokens per network")
        return
    work_root = Path(args.work_dir) if args.work_dir else WORK_ROOT / "zoo_suite"
    save_entry(run_zoo(args.zoo, work_root))


if __name__ == "__main__":
    main()
