"""Scale: SANE on ResNet-18 checkpoints, 53,524 tokens per network, with halo windows and BN conditioning.

    python -m benchmarks.reproduce.resnet18 --scale cpu   # a handful of networks (see SCALES)
    python -m benchmarks.reproduce.resnet18 --scale gpu   # one H100

A seed zoo of ResNet-18 (CIFAR stem, BatchNorm, 11.2M parameters) on the MNIST subset upsampled
to 32x32 RGB (no CIFAR download here). Tokens of 288 values with BatchNorm kept: 53,524 tokens in
81 layers per network (10 classes; 53,704 with 100 classes). SANE only ever sees windows of the
sequence; embedding and decoding run over halo windows of the whole sequence.

Stages: zoo, dataset (float16 tokens), SANE pretraining, Table 1 probes (SANE vs s(W); W is too
large), then the paper's ResNet ablation at epoch 0: samples decoded with plain windows vs halo
windows, with and without BatchNorm conditioning (and "both" after fine-tuning too).

The cpu scale shows that every step runs at this sequence length on a 2-core CPU; with a handful
of networks trained for 2 epochs its numbers say little about the method's quality.
Results: ``benchmarks/results/reproduce_resnet18_<scale>.json`` and ``..._probe.png``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    default_device,
    parse_args,
    result_path,
    work_dir,
    write_experiment_results,
)
from sane_hf import ZooConfig
from sane_hf.pretraining.loop import SUMMARY_FILE
from sane_hf.recipes.experiments import (
    SamplingMethod,
    SamplingSettings,
    StageLog,
    build_dataset_stage,
    cached_sampling,
    compare_sampling,
    experiment_pretraining,
    pretrain_stage,
    probe_stage,
    r2_table,
    zoo_stage,
)

RESNET_HYPERPARAMETERS = {"activation": "relu", "init": "default", "optimizer": "adam", "lr": 1e-3}


@dataclass
class Scale:
    zoo: ZooConfig
    pretraining: dict[str, Any]
    sampling: SamplingSettings
    both_finetune_epochs: int  # fine-tuning of the halo + BN variant (the others: epoch 0 only)


SCALES = {
    # 2-core CPU: 8 networks (5 train / 1 validation / 2 test) on 600 images, 2 epochs.
    "cpu": Scale(
        zoo=ZooConfig(
            architecture="resnet18",
            dataset="mnist",
            dataset_kwargs={"num_samples": 600},
            input_shape=(3, 32, 32),
            num_models=8,
            epochs=2,
            batch_size=32,
            hyperparameters=RESNET_HYPERPARAMETERS,
        ),
        pretraining={
            "model": {"preset": "tiny", "windowsize": 64, "max_positions": [55_000, 128, 1024]},
            "epoch_size": 4096,
            "num_epochs": 8,
            "learning_rate": 3e-3,
            "warmup_fraction": 0.1,
            "checkpointing_steps": 256,
            "checkpoints_total_limit": 1,
            "logging_steps": 64,
            "report_to": "none",
        },
        sampling=SamplingSettings(num_prompts=5, num_samples=3, bn_batches=10, finetune_epochs=0),
        both_finetune_epochs=1,
    ),
    # One H100: 50 networks on the full MNIST subset, 10 epochs, SANE `resnet18` preset.
    "gpu": Scale(
        zoo=ZooConfig(
            architecture="resnet18",
            dataset="mnist",
            input_shape=(3, 32, 32),
            num_models=50,
            epochs=10,
            checkpoint_epochs=[0, 1, 2, 5, 10],
            batch_size=32,
            hyperparameters=RESNET_HYPERPARAMETERS,
            models_per_chunk=25,
            device="cuda",
        ),
        pretraining={  # the resnet18 preset's recipe (AdamW 1e-4, wd 3e-9, bf16) and run plumbing
            "base": "resnet18",
            "model": {"preset": "resnet18"},
            "epoch_size": 65_536,
            "num_epochs": 20,
            "checkpointing_steps": 1000,
            "checkpoints_total_limit": 1,
            "report_to": "none",
        },
        sampling=SamplingSettings(num_prompts=20, num_samples=10, bn_batches=10, finetune_epochs=0),
        both_finetune_epochs=5,
    ),
}


def ablation_variants(scale: Scale) -> dict[str, SamplingSettings]:
    """Plain windows (no context) vs halo windows of the same total length, with and without
    BatchNorm conditioning (paper: 10.0 / 14.5 / 60.8 / 64.8% at epoch 0 on CIFAR-10)."""
    window = scale.pretraining["model"].get("windowsize", 256)
    plain = {"window": window, "halo": 0}
    halo = {"window": window // 2, "halo": window // 4}
    return {
        "plain": dataclasses.replace(scale.sampling, **plain, condition_bn=False),
        "halo": dataclasses.replace(scale.sampling, **halo, condition_bn=False),
        "BN conditioning": dataclasses.replace(scale.sampling, **plain, condition_bn=True),
        "halo + BN conditioning": dataclasses.replace(
            scale.sampling, **halo, condition_bn=True, finetune_epochs=scale.both_finetune_epochs
        ),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale, work = SCALES[args.scale], work_dir(args, "resnet18")
    log = StageLog(num_stages=5, record=work / "stage_times.json")

    with log.stage("zoo", f"training {scale.zoo.num_models} ResNet-18 (resumes)"):
        zoo_stage(scale.zoo, work / "zoo", result_path("resnet18", args.scale, "_zoo.png"))
    with log.stage("dataset", "zoo dataset: 288-value tokens, BatchNorm kept, float16"):
        zoo = build_dataset_stage(work / "zoo", work / "dataset", tokensize=288, dtype="float16")
        print(
            f"    {zoo.metadata.layout.num_tokens} tokens in {zoo.metadata.layout.num_layers} layers"
        )
    with log.stage("pretraining", f"pretraining SANE ({scale.pretraining['model']}) on windows"):
        model = pretrain_stage(experiment_pretraining(scale.pretraining, work)).to(
            str(default_device())
        )
    with log.stage("probing", "Table 1: SANE vs s(W) (halo-window embeddings)"):
        report = probe_stage(
            model,
            zoo,
            RESULTS_DIR,
            name=f"reproduce_resnet18_{args.scale}_probe",
            baselines=["s(W)"],
        )
        print(report.table())
    with log.stage("sampling", "sampling ablation: halo windows and BatchNorm conditioning"):
        ablation = {}
        for name, settings in ablation_variants(scale).items():
            results = cached_sampling(
                work / f"sampling_{name.replace(' ', '_')}.json",
                lambda settings=settings: compare_sampling(
                    model, zoo, [SamplingMethod("kde")], settings
                ),
            )
            print(f"{name}:\n{results.table()}")
            ablation[name] = results.to_dict() | {"summary": results.evaluation.summary()}

    write_experiment_results(
        "resnet18",
        args.scale,
        {
            "setup": {
                "zoo": scale.zoo.to_dict(),
                "pretraining": scale.pretraining,
                "sampling": {
                    name: dataclasses.asdict(s) for name, s in ablation_variants(scale).items()
                },
                "num_tokens": zoo.metadata.layout.num_tokens,
                "num_layers": zoo.metadata.layout.num_layers,
            },
            "zoo_statistics": zoo.metadata.statistics,
            "pretraining": json.loads((work / "sane" / SUMMARY_FILE).read_text()),
            "table1_r2": r2_table(report.to_dict()),
            "sampling_ablation": ablation,
            "wall_time_s": log.seconds,
        },
    )


if __name__ == "__main__":
    main()
