"""Hyperparameter zoo: can linear probes of SANE embeddings tell how a network was trained?

    python -m benchmarks.reproduce.hyperparameter --scale cpu   # 2-core CPU (see SCALES)
    python -m benchmarks.reproduce.hyperparameter --scale gpu   # full grid, one H100

A CNN-s zoo over the Model Zoos grid: activation (tanh, relu, sigmoid, gelu) x dropout (0, 0.5)
x init (uniform, normal, kaiming_uniform, kaiming_normal) x optimizer (adam, sgd) x lr (1e-3,
1e-4) x weight decay (1e-3, 1e-4) = 256 combinations. SANE is pretrained on all checkpoints of
the training split; linear probes predict the categorical hyperparameters (test accuracy of a
logistic probe: activation, init, optimizer, dropout), the numeric ones (test R^2: lr, weight
decay) and the Table 1 properties, SANE embeddings vs s(W) vs raw weights W.

Results: ``benchmarks/results/reproduce_hyperparameter_<scale>.json`` and ``..._{zoo,probe}.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from benchmarks.common import (
    CPU_PRETRAINING,
    GPU_PRETRAINING,
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
    TABLE1_PROPERTIES,
    StageLog,
    build_dataset_stage,
    experiment_pretraining,
    pretrain_stage,
    probe_stage,
    zoo_stage,
)

CATEGORICAL = ("activation", "init", "optimizer")
NUMERIC = ("lr", "weight_decay", "dropout")


@dataclass
class Scale:
    zoo: ZooConfig
    pretraining: dict[str, Any]


SCALES = {
    # 2-core CPU: 128 of the 256 grid points on digits, 8 epochs, a small SANE.
    "cpu": Scale(
        zoo=ZooConfig(dataset="digits", kind="hyperparameter", num_models=128, epochs=8),
        pretraining={**CPU_PRETRAINING, "num_epochs": 60},
    ),
    # The full grid with 4 seeds each (1,024 models) on the MNIST subset, 50 epochs, SANE `cnn`.
    "gpu": Scale(
        zoo=ZooConfig(
            dataset="mnist",
            kind="hyperparameter",
            num_models=None,
            seeds_per_combination=4,
            epochs=50,
            checkpoint_epochs=list(range(0, 51, 5)),
            models_per_chunk=1000,
            device="cuda",
        ),
        pretraining=GPU_PRETRAINING,
    ),
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale, work = SCALES[args.scale], work_dir(args, "hyperparameter")
    log = StageLog(num_stages=4, record=work / "stage_times.json")

    with log.stage("zoo", f"training the hyperparameter zoo ({scale.zoo.num_models} CNN-s)"):
        zoo_stage(scale.zoo, work / "zoo", result_path("hyperparameter", args.scale, "_zoo.png"))
    with log.stage("dataset", "building the zoo dataset"):
        zoo = build_dataset_stage(work / "zoo", work / "dataset")
    with log.stage("pretraining", f"pretraining SANE ({scale.pretraining['model']})"):
        model = pretrain_stage(experiment_pretraining(scale.pretraining, work)).to(
            str(default_device())
        )
    with log.stage("probing", "probing for hyperparameters: SANE vs s(W) vs W"):
        report = probe_stage(
            model,
            zoo,
            RESULTS_DIR,
            name=f"reproduce_hyperparameter_{args.scale}_probe",
            properties=[*CATEGORICAL, *NUMERIC, *TABLE1_PROPERTIES],
        )
        print(report.table())

    write_experiment_results(
        "hyperparameter",
        args.scale,
        {
            "setup": {"zoo": scale.zoo.to_dict(), "pretraining": scale.pretraining},
            "zoo_statistics": zoo.metadata.statistics,
            "pretraining": json.loads((work / "sane" / SUMMARY_FILE).read_text()),
            "probes": report.to_dict(),
            "wall_time_s": log.seconds,
        },
    )


if __name__ == "__main__":
    main()
