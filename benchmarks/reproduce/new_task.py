"""Sampling for a new task: SANE pretrained on the MNIST zoo, prompted with digits networks.

    python -m benchmarks.reproduce.new_task --scale cpu   # 2-core CPU (new_task-cpu.yaml)
    python -m benchmarks.reproduce.new_task --scale gpu   # one H100

SANE and its zoo come from ``benchmarks/reproduce/mnist.py`` (the same scale, the same work
folder: its finished stages are reused, missing ones run first). The new task is scikit-learn's
digits (resized to 28x28, same CNN-s): a small digits zoo provides the prompts, which are
aligned to the MNIST zoo's reference and normalized with its statistics before SANE encodes
them. Sampled networks are fine-tuned on digits next to

- networks trained from scratch,
- the prompts themselves, fine-tuned further (what the prompts already know),
- MNIST zoo networks fine-tuned on digits (plain transfer learning from the pretraining zoo),

all with the zoo recipe (Adam 3e-4, batch 10), mean ± std over the networks of each group.

Results: ``benchmarks/results/reproduce_new_task_<scale>.json`` and ``..._sampling.png``.
"""

from __future__ import annotations

from benchmarks.common import (
    RESULTS_DIR,
    WORK_ROOT,
    experiment_spec,
    parse_args,
    work_dir,
    write_experiment_results,
)
from sane_hf.downstream.sampling import select_prompts
from sane_hf.recipes.experiments import run_experiment
from sane_hf.recipes.sampling import prompt_networks


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    spec = experiment_spec("new_task", args.scale, args.overrides)
    transfer_epoch = spec.dataset.epoch_range[1]  # the epoch SANE's prompts are taken at
    num_samples = spec.run_settings(spec.sampling_runs[0]).num_samples

    def transfer(mnist_zoo):
        rows = select_prompts(mnist_zoo.splits["train"], num_samples, transfer_epoch)
        return {"MNIST networks (transfer)": prompt_networks(mnist_zoo, rows)}

    results = run_experiment(
        spec,
        work_dir(args, "new_task"),
        RESULTS_DIR,
        f"reproduce_new_task_{args.scale}_",
        sane_dir=WORK_ROOT / f"mnist-{args.scale}",
        extra_groups=transfer,
    )
    sampling = results.sampling["sampling"]
    write_experiment_results(
        "new_task",
        args.scale,
        {
            "setup": spec.to_dict()
            | {
                "mnist": f"benchmarks/reproduce/mnist.py --scale {args.scale}",
                "transfer_epoch": transfer_epoch,
            },
            "digits_zoo_statistics": results.prompt_zoo.metadata.statistics,
            "sampling": sampling.to_dict() | {"summary": sampling.evaluation.summary()},
            "table_epochs": spec.sampling_runs[0].table_epochs,
            "wall_time_s": results.seconds,
        },
    )


if __name__ == "__main__":
    main()
