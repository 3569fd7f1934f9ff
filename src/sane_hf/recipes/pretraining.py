"""Pretraining as a user runs it (`sane-hf pretrain`, the demo, the reproductions): the run of
`sane_hf.pretraining.loop.pretrain`, then the probe heads that ship with the model.

The heads are fitted here, not in the pretraining layer, because fitting them embeds the zoo with
the trained model (a downstream task). The push, when asked for, comes last, so the Hub repo holds
the model, its processor and its heads in one commit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import PartialState

from sane_hf.downstream.probe_heads import fit_probe_heads
from sane_hf.hub import folder_model_card
from sane_hf.models.sane.modeling_sane import SaneModel
from sane_hf.pretraining.config import PretrainingConfig
from sane_hf.pretraining.loop import SUMMARY_FILE, pretrain, push_run
from sane_hf.zoo.mixed import is_mixed_dataset, load_mixed_dataset
from sane_hf.zoo.storage import load_zoo_dataset


def pretrain_with_probe_heads(config: PretrainingConfig) -> dict[str, Any]:
    """`pretrain(config)`, then, on the main process of a finished run, probe heads fitted on the
    zoo's splits saved beside the model (``ProbeHeads.from_pretrained(output_dir)``), then the
    push. Returns pretraining's summary, with the heads' test scores under ``probe_heads``."""
    summary = pretrain(dataclasses.replace(config, push_to_hub=False))
    output_dir = Path(config.output_dir)
    finished = (output_dir / "model.safetensors").is_file() and (
        output_dir / SUMMARY_FILE
    ).is_file()
    if not finished or not PartialState().is_main_process:
        return summary  # a run stopped early (stop_at_step) resumes later; other ranks are done
    model = SaneModel.from_pretrained(output_dir).eval()
    load = load_mixed_dataset if is_mixed_dataset(config.dataset) else load_zoo_dataset
    zoo = load(config.dataset)
    heads = fit_probe_heads(model, zoo.splits, zoo_dataset=model.config.zoo_dataset)
    heads.save_pretrained(output_dir)
    folder_model_card(output_dir, config.hub_model_id or str(output_dir)).save(
        output_dir / "README.md"
    )
    summary["probe_heads"] = heads.test_scores()
    if config.push_to_hub:
        push_run(output_dir, config.hub_model_id)
    return summary
