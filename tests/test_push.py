"""`sane-hf push` and extra model-card sections, against the in-memory fake Hub.

The fake Hub checks our use of the huggingface_hub client, not the real upload path.
"""

import numpy as np
import torch
from huggingface_hub import ModelCard

from sane_hf import SaneConfig, SaneModel
from sane_hf.cli import main
from sane_hf.hub import build_model_card, save_model_card
from sane_hf.zoo.dataset import build_zoo_dataset, load_zoo_dataset, save_zoo_dataset
from synthetic_zoo import write_raw_zoo


def test_push_model_folder_uploads_weights_card_and_zoo_metadata(fake_hub, tmp_path, capsys):
    config = SaneConfig.from_preset("tiny", tokensize=13, zoo_dataset="fake-user/zoo")
    model = SaneModel(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "sane")
    save_model_card(model, tmp_path / "sane", metrics={"r2_test_acc": 0.5})
    (tmp_path / "sane" / "sane_zoo.json").write_text('{"zoo": "metadata"}\n')

    assert main(["push", str(tmp_path / "sane"), "fake-user/sane-tiny"]) == 0

    assert "pushed" in capsys.readouterr().out
    files = fake_hub.repo_files("fake-user/sane-tiny")
    assert {"config.json", "model.safetensors", "README.md", "modeling_sane.py"} <= set(files)
    assert files["sane_zoo.json"] == b'{"zoo": "metadata"}\n'
    loaded = SaneModel.from_pretrained("fake-user/sane-tiny")
    assert loaded.dtype == torch.bfloat16
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert ModelCard.load("fake-user/sane-tiny").data.eval_results[0].metric_value == 0.5


def test_push_zoo_dataset_folder_goes_through_parquet(fake_hub, tmp_path):
    raw = write_raw_zoo(tmp_path / "raw", num_models=10)
    save_zoo_dataset(build_zoo_dataset(raw, tokensize=13, progress=False), tmp_path / "zoo")

    assert main(["push", str(tmp_path / "zoo"), "fake-user/zoo"]) == 0

    files = fake_hub.repo_files("fake-user/zoo", repo_type="dataset")
    assert any(name.endswith(".parquet") for name in files)
    pushed, local = load_zoo_dataset("fake-user/zoo"), load_zoo_dataset(tmp_path / "zoo")
    # the same description; the fingerprint describes only the local Arrow files
    assert pushed.metadata.to_dict() | {"fingerprint": local.metadata.fingerprint} == (
        local.metadata.to_dict()
    )
    for split in local.splits:
        assert np.array_equal(
            pushed.splits[split].with_format("numpy")["tokens"],
            local.splits[split].with_format("numpy")["tokens"],
        )


def test_push_rejects_a_folder_that_is_neither_model_nor_zoo(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to push")
    assert main(["push", str(tmp_path), "fake-user/x"]) == 2
    assert "neither a SANE model folder" in capsys.readouterr().err


def test_model_card_renders_extra_sections_in_order():
    config = SaneConfig.from_preset("tiny", zoo_dataset="fake-user/zoo")
    sections = {"Zoo and protocol": "CNN-s on MNIST.", "Limitations": "- trained on a CPU"}
    card = build_model_card(
        config, num_parameters=123, model_id="fake-user/m", metrics={"r2": 0.9}, sections=sections
    )
    text = str(card)
    assert text.index("## Intended use") < text.index("## Zoo and protocol")
    assert text.index("## Zoo and protocol\n\nCNN-s on MNIST.") < text.index("## Limitations")
    assert text.index("- trained on a CPU") < text.index("## Usage")
    assert card.data.eval_results[0].metric_value == 0.9
