"""Scale: SANE on ResNet-18 checkpoints, 53,524 tokens per network, with halo windows and BN conditioning.

    python -m benchmarks.reproduce.resnet18 --scale cpu   # a handful of networks (resnet18-cpu.yaml)
    python -m benchmarks.reproduce.resnet18 --scale gpu   # one H100

A seed zoo of ResNet-18 (CIFAR stem, BatchNorm, 11.2M parameters) on the MNIST subset upsampled
to 32x32 RGB (no CIFAR download here). Tokens of 288 values with BatchNorm kept: 53,524 tokens in
81 layers per network (10 classes; 53,704 with 100 classes). SANE only ever sees windows of the
sequence; embedding and decoding run over halo windows of the whole sequence.

Stages (`run_experiment` of the ``resnet18-<scale>`` spec): zoo, dataset (float16 tokens), SANE
pretraining, Table 1 probes (SANE vs s(W); W is too large), then the paper's ResNet ablation at
epoch 0: samples decoded with plain windows vs halo windows of the same total length, with and
without BatchNorm conditioning (and "both" after fine-tuning too; paper: 10.0 / 14.5 / 60.8 /
64.8% at epoch 0 on CIFAR-10).

The cpu scale shows that every step runs at this sequence length on a 2-core CPU; with a handful
of networks trained for 2 epochs its numbers say little about the method's quality.
Results: ``benchmarks/results/reproduce_resnet18_<scale>.json`` and ``..._probe.png``.
"""

from __future__ import annotations

import dataclasses

from benchmarks.common import (
    RESULTS_DIR,
    experiment_spec,
    parse_args,
    work_dir,
    write_experiment_results,
)
from sane_hf.recipes.experiments import r2_table, run_experiment


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    spec = experiment_spec("resnet18", args.scale, args.overrides)
    results = run_experiment(
        spec, work_dir(args, "resnet18"), RESULTS_DIR, f"reproduce_resnet18_{args.scale}_"
    )
    layout = results.zoo.metadata.layout
    print(f"    {layout.num_tokens} tokens in {layout.num_layers} layers")
    variants = {run.description: run for run in spec.sampling_runs}
    write_experiment_results(
        "resnet18",
        args.scale,
        {
            "setup": spec.to_dict()
            | {
                "sampling": {
                    name: dataclasses.asdict(spec.run_settings(run))
                    for name, run in variants.items()
                },
                "num_tokens": layout.num_tokens,
                "num_layers": layout.num_layers,
            },
            "zoo_statistics": results.zoo.metadata.statistics,
            "pretraining": results.pretraining,
            "table1_r2": r2_table(results.probes.to_dict()),
            "sampling_ablation": {
                name: results.sampling[run.name].to_dict()
                | {"summary": results.sampling[run.name].evaluation.summary()}
                for name, run in variants.items()
            },
            "wall_time_s": results.seconds,
        },
    )


if __name__ == "__main__":
    main()
