"""`pretrain`, the one pretraining entry point (`sane-hf pretrain`, the demo, the experiments):
the Accelerate run of `sane_hf.pretraining.loop.train_sane`, then the probe heads and the
in-distribution reference (`sane_hf.downstream.ood`) that ship with the model, then the push.

The heads are fitted here, not in the pretraining layer, because fitting them embeds the zoo with
the trained model (a downstream task). The push, when asked for, comes last, so the Hub repo holds
the model, its processor and its heads in one commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from accelerate import PartialState

from sane_hf.downstream.ood import InDistributionReference
from sane_hf.downstream.probe_heads import fit_probe_heads
from sane_hf.hub import HubError, folder_model_card, push_folder
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE, train_sane
from sane_hf.pretraining.run_lock import pretraining_run_lock
from sane_hf.zoo.mixed import is_mixed_dataset, load_mixed_dataset
from sane_hf.zoo.storage import load_zoo_dataset


def pretrain(config: PretrainingConfig) -> dict[str, Any]:
    """Pretrain SANE as ``config`` says and write model, processor and probe heads.

    `train_sane(config)`, then, on the main process of a finished run, probe heads fitted on the
    zoo's splits saved beside the model (``ProbeHeads.from_pretrained(output_dir)``), then with
    ``push_to_hub`` the push of the whole folder in one commit. Returns the training summary,
    with the heads' test scores under ``probe_heads``. The output folder stays locked until the
    heads are saved (`pretraining_run_lock`).
    """
    with pretraining_run_lock(config):
        return _pretrain(config)


def _pretrain(config: PretrainingConfig) -> dict[str, Any]:
    summary = train_sane(config)
    output_dir = Path(config.output_dir)
    finished = (output_dir / "model.safetensors").is_file() and (
        output_dir / SUMMARY_FILE
    ).is_file()
    if not finished or not PartialState().is_main_process:
        return summary  # a run stopped early (stop_at_step) resumes later; other ranks are done
    return finish_run(config, summary)


def finish_run(config: PretrainingConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """What follows a finished training run on the main process (also of
    ``training/pretrain_sane.py``): probe heads fitted on the zoo's splits saved beside the
    model with the in-distribution reference (single-architecture zoos), the model card that
    lists them, then with ``push_to_hub`` one push of it all. Returns ``summary`` with the heads' test scores under ``probe_heads``."""
    output_dir = Path(config.output_dir)
    model = SaneModel.from_pretrained(output_dir).eval()
    mixed = is_mixed_dataset(config.dataset)
    zoo = (load_mixed_dataset if mixed else load_zoo_dataset)(config.dataset)
    heads = fit_probe_heads(model, zoo.splits, zoo_dataset=model.config.zoo_dataset)
    heads.save_pretrained(output_dir)
    if not mixed:  # the reference compares with one layout's tokens; mixed zoos have none yet
        reference = InDistributionReference.fit(
            model, zoo.splits, zoo_dataset=model.config.zoo_dataset
        )
        reference.save_pretrained(output_dir)
    folder_model_card(output_dir, config.hub_model_id or str(output_dir)).save(
        output_dir / "README.md"
    )
    summary["probe_heads"] = heads.test_scores()
    if config.push_to_hub:
        push_run(output_dir, config.hub_model_id)
    return summary


def push_run(output_dir: str | os.PathLike, repo_id: str) -> None:
    """Upload a finished run's folder with `push_folder` (model, processor, heads, card, zoo
    metadata, config, logs; no checkpoints) in one commit. A failure is one line naming the repo
    and the HTTP status; the folder is complete on disk, so ``sane-hf push`` retries it."""
    try:
        push_folder(output_dir, repo_id, commit_message="Upload SANE model pretrained with sane-hf")
    except HubError as error:
        raise HubError(
            f"{error}; the run is saved in {output_dir}: retry with "
            f"`sane-hf push {output_dir} {repo_id}`"
        ) from None


__all__ = ["finish_run", "pretrain", "push_run"]
