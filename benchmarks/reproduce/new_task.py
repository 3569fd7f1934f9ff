"""Sampling for a new task: SANE pretrained on the MNIST zoo, prompted with digits networks.

    python -m benchmarks.reproduce.new_task --scale cpu   # 2-core CPU (see SCALES)
    python -m benchmarks.reproduce.new_task --scale gpu   # one H100

SANE and its zoo come from ``reproduce_mnist.py`` (same scale, same work folder: its finished
stages are reused, missing ones run first). The new task is scikit-learn's digits (resized to
28x28, same CNN-s): a small digits zoo provides the prompts, which are aligned to the MNIST zoo's
reference and normalized with its statistics before SANE encodes them. Sampled networks are
fine-tuned on digits next to

- networks trained from scratch,
- the prompts themselves, fine-tuned further (what the prompts already know),
- MNIST zoo networks fine-tuned on digits (plain transfer learning from the pretraining zoo),

all with the zoo recipe (Adam 3e-4, batch 10), mean ± std over the networks of each group.

Results: ``benchmarks/results/reproduce_new_task_<scale>.json`` and ``..._sampling.png``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from benchmarks.common import WORK_ROOT, parse_args, result_path, work_dir, write_experiment_results
from benchmarks.reproduce.mnist import SCALES as MNIST_SCALES
from benchmarks.reproduce.mnist import mnist_zoo_and_sane
from sane_hf import ZooConfig, train_zoo
from sane_hf.downstream.sampling import select_prompts
from sane_hf.recipes.experiments import (
    SamplingMethod,
    SamplingSettings,
    StageLog,
    build_dataset_stage,
    cached_sampling,
    compare_sampling,
    prompt_networks,
)

METHODS = (SamplingMethod("kde"), SamplingMethod("subsampled"))


@dataclass
class Scale:
    digits_zoo: ZooConfig  # the new task's zoo: where the prompts come from
    sampling: SamplingSettings
    table_epochs: tuple[int, ...]


SCALES = {
    # 2-core CPU: 20 digits networks trained 5 epochs, 10 prompts, 5 samples per method.
    "cpu": Scale(
        digits_zoo=ZooConfig(dataset="digits", num_models=20, epochs=5),
        sampling=SamplingSettings(
            num_prompts=10, num_samples=5, num_candidates=25, rounds=2, finetune_epochs=5
        ),
        table_epochs=(0, 1, 5),
    ),
    "gpu": Scale(
        digits_zoo=ZooConfig(dataset="digits", num_models=100, epochs=25, device="cuda"),
        sampling=SamplingSettings(
            num_prompts=30, num_samples=10, num_candidates=50, rounds=3, finetune_epochs=25
        ),
        table_epochs=(0, 1, 5, 25),
    ),
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    scale, work = SCALES[args.scale], work_dir(args, "new_task")
    log = StageLog(num_stages=5, record=work / "stage_times.json")
    mnist_zoo, model = mnist_zoo_and_sane(args.scale, WORK_ROOT / f"mnist-{args.scale}", log)

    with log.stage("digits_zoo", f"the new task's zoo ({scale.digits_zoo.num_models} on digits)"):
        train_zoo(scale.digits_zoo, work / "digits_zoo")
        digits_zoo = build_dataset_stage(work / "digits_zoo", work / "digits_dataset")

    with log.stage("sampling", "digits networks sampled by the MNIST SANE vs the baselines"):
        pretrain_epoch = MNIST_SCALES[args.scale].pretrain_epochs
        transfer_rows = select_prompts(
            mnist_zoo.splits["train"], scale.sampling.num_samples, pretrain_epoch
        )
        results = cached_sampling(
            work / "new_task.json",
            lambda: compare_sampling(
                model,
                mnist_zoo,
                METHODS,
                scale.sampling,
                prompt_zoo=digits_zoo,
                include_prompts=True,
                extra_groups={
                    "MNIST networks (transfer)": prompt_networks(mnist_zoo, transfer_rows)
                },
            ),
        )
        results.evaluation.plot(result_path("new_task", args.scale, "_sampling.png"))
        print(results.table(scale.table_epochs))

    write_experiment_results(
        "new_task",
        args.scale,
        {
            "setup": {
                "mnist": f"reproduce_mnist.py --scale {args.scale}",
                "digits_zoo": scale.digits_zoo.to_dict(),
                "sampling": dataclasses.asdict(scale.sampling),
                "transfer_epoch": pretrain_epoch,
            },
            "digits_zoo_statistics": digits_zoo.metadata.statistics,
            "sampling": results.to_dict() | {"summary": results.evaluation.summary()},
            "table_epochs": list(scale.table_epochs),
            "wall_time_s": log.seconds,
        },
    )


if __name__ == "__main__":
    main()
