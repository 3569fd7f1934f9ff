"""Hyperparameter zoo: can linear probes of SANE embeddings tell how a network was trained?

    python -m benchmarks.reproduce.hyperparameter --scale cpu   # 2-core CPU (hyperparameter-cpu.yaml)
    python -m benchmarks.reproduce.hyperparameter --scale gpu   # full grid, one H100

A CNN-s zoo over the Model Zoos grid: activation (tanh, relu, sigmoid, gelu) x dropout (0, 0.5)
x init (uniform, normal, kaiming_uniform, kaiming_normal) x optimizer (adam, sgd) x lr (1e-3,
1e-4) x weight decay (1e-3, 1e-4) = 256 combinations. SANE is pretrained on all checkpoints of
the training split; linear probes predict the categorical hyperparameters (test accuracy of a
logistic probe: activation, init, optimizer), the numeric ones (test R^2: lr, weight decay,
dropout) and the Table 1 properties, SANE embeddings vs s(W) vs raw weights W
(`run_experiment` of the ``hyperparameter-<scale>`` spec in ``sane_hf/presets/experiment``).

Results: ``benchmarks/results/reproduce_hyperparameter_<scale>.json`` and
``..._{zoo_accuracy,probe}.png``.
"""

from __future__ import annotations

from benchmarks.common import (
    RESULTS_DIR,
    experiment_spec,
    parse_args,
    work_dir,
    write_experiment_results,
)
from sane_hf.recipes.experiments import run_experiment


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    spec = experiment_spec("hyperparameter", args.scale, args.overrides)
    work = work_dir(args, "hyperparameter")
    results = run_experiment(spec, work, RESULTS_DIR, f"reproduce_hyperparameter_{args.scale}_")
    write_experiment_results(
        "hyperparameter",
        args.scale,
        {
            "setup": spec.to_dict(),
            "zoo_statistics": results.zoo.metadata.statistics,
            "pretraining": results.pretraining,
            "probes": results.probes.to_dict(),
            "wall_time_s": results.seconds,
        },
    )


if __name__ == "__main__":
    main()
