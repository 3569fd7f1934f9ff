"""The released sane-cnn-mnist on its own zoo: every probe feature set, and the selection-matched
memorization baseline.

    python -m benchmarks.reproduce.mnist --scale cpu      # stages 1-2 rebuild the zoo dataset
    python -m benchmarks.reproduce.release_checks

1. Probes (test R^2 and Kendall tau of test accuracy, epoch, generalization gap) of every SANE
   feature set (mean, per-layer means, s(Z)), of SANE + s(W) (its own row, not SANE alone), and
   of the s(W) and W baselines; the SANE set per property is the one with the best *validation*
   score.
2. Sampling around the test split's best epoch-6 networks with the zoo suite's settings
   (subsampling keeps the best 10 of 25 candidates by accuracy on 500 training images), next to
   matched noise drawn once and matched noise selected the same way (25 candidates, the same
   score), and the prompts themselves; accuracy at epoch 0 (no fine-tuning).
3. The in-distribution signal's flag rates (`zoo_suite.in_distribution_rates`, reference fitted
   on the zoo's train and validation splits): the test split's networks (epochs 1-6, false
   alarms), the test models' untrained epoch-0 checkpoints, untrained default-init networks.
   ``--in-distribution-only`` reruns this part alone and keeps the rest of the result file.

Writes ``benchmarks/results/release_checks_sane_cnn_mnist.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, WORK_ROOT, machine_info
from benchmarks.reproduce.zoo_suite import SAMPLING, SUBSAMPLED, epoch0, in_distribution_rates
from sane_hf import SaneModel
from sane_hf.downstream.features import HEAD_FEATURE_SETS, SANE_ONLY_FEATURE_SETS
from sane_hf.downstream.probing import probe_zoo
from sane_hf.recipes.experiments import r2_table
from sane_hf.recipes.sampling import compare_sampling
from sane_hf.zoo.storage import load_zoo_dataset

ROOT = Path(__file__).parent.parent.parent
RELEASED = ROOT / "checkpoints" / "sane-cnn-mnist"


RESULT_FILE = RESULTS_DIR / "release_checks_sane_cnn_mnist.json"
PRETRAIN_EPOCHS = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-distribution-only", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    model = SaneModel.from_pretrained(RELEASED).float().eval()
    work = WORK_ROOT / "mnist-cpu"
    zoo = load_zoo_dataset(work / "dataset")
    rates = in_distribution_rates(model, zoo, work / "zoo", PRETRAIN_EPOCHS)
    print(json.dumps(rates, indent=1))
    if args.in_distribution_only:
        result = json.loads(RESULT_FILE.read_text())
        result["in_distribution_flag_rates"] = rates
        RESULT_FILE.write_text(json.dumps(result, indent=1) + "\n")
        return
    report = probe_zoo(
        model,
        zoo.splits,
        properties=["test_acc", "epoch", "ggap"],
        feature_sets=HEAD_FEATURE_SETS,
        progress=False,
    )
    print(report.table())
    chosen = {
        name: report.best(name, SANE_ONLY_FEATURE_SETS).features for name in report.properties
    }
    settings = dataclasses.replace(SAMPLING, finetune_epochs=0)
    sampling = compare_sampling(model, zoo, [SUBSAMPLED], settings)
    print(sampling.table())
    evaluation = sampling.evaluation
    result = {
        "model": str(RELEASED.relative_to(ROOT)),
        "probes_test_r2": r2_table(report.to_dict()),
        "probes_validation_r2": r2_table(report.to_dict(), "validation_score"),
        "probes_kendall_tau": r2_table(report.to_dict(), "kendall_tau"),
        "sane_features_chosen_on_validation": chosen,
        "epoch0_accuracy": {
            "prompts": epoch0(sampling, "prompts"),
            SUBSAMPLED.name: epoch0(sampling, SUBSAMPLED.name),
            "matched noise": epoch0(sampling, evaluation.matched[SUBSAMPLED.name]),
            "matched noise, selected the same way": epoch0(
                sampling, evaluation.selected[SUBSAMPLED.name]
            ),
            "ensemble of 2 prompts": epoch0(sampling, "ensemble of 2 prompts"),
        },
        "in_distribution_flag_rates": rates,
        "sampling_settings": dataclasses.asdict(settings),
        "command": "python -m benchmarks.reproduce.release_checks",
        "wall_time_s": round(time.perf_counter() - started, 1),
        "machine": machine_info(torch.device("cpu")),
    }
    path = RESULT_FILE
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("sane_features_chosen_on_validation", "epoch0_accuracy")},
            indent=1,
        )
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
