"""`sane-hf push` and extra model-card sections, against the in-memory fake Hub.

The fake Hub checks our use of the huggingface_hub client, not the real upload path.
"""

import importlib
import json

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import errors as hub_errors
from huggingface_hub.errors import HfHubHTTPError

from sane_hf import SaneConfig, SaneModel
from sane_hf.cli import main
from sane_hf.hub import HubError, build_model_card, push_folder, save_model_card
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset
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


def test_push_rejects_a_folder_that_is_neither_model_nor_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing to push")
    with pytest.raises(ValueError, match="neither a SANE model folder"):
        push_folder(tmp_path, "fake-user/x")


def test_push_model_folder_in_one_commit_with_a_card_for_the_repo(fake_hub, tmp_path):
    config = SaneConfig.from_preset("tiny", tokensize=13, zoo_dataset="fake-user/zoo")
    model = SaneModel(config)
    folder = tmp_path / "sane"
    model.save_pretrained(folder)
    save_model_card(model, folder, metrics={"val_mse": 0.25})  # names the local folder
    (folder / "probe_heads.json").write_text(
        json.dumps({"heads": [{"name": "test_acc", "metric": "r2", "test_score": 0.75}]})
    )
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.bin").write_bytes(b"resumable state")

    push_folder(folder, "fake-user/sane-tiny")

    titles = fake_hub.commit_titles("fake-user/sane-tiny")
    assert titles == ["Upload SANE model with sane-hf", "initial commit"]
    files = fake_hub.repo_files("fake-user/sane-tiny")
    assert not any(name.startswith("checkpoint-") for name in files)
    assert {"model.safetensors", "config.json", "probe_heads.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert 'from_pretrained("fake-user/sane-tiny")' in card and str(folder) not in card
    assert "datasets/fake-user/zoo" in card
    results = {r.metric_name: r.metric_value for r in ModelCard(card).data.eval_results}
    assert results == {"val_mse": 0.25, "R^2 test_acc (shipped probe head, test split)": 0.75}


def test_push_http_errors_are_one_line_with_repo_and_status(tmp_path, monkeypatch):
    SaneModel(SaneConfig.from_preset("tiny", tokensize=13)).save_pretrained(tmp_path)

    # the HTTP library huggingface_hub uses (httpx, or httpx2 in huggingface_hub 2)
    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])

    def forbidden(*args, **kwargs):
        request = http.Request("POST", "https://huggingface.co/api/repos/create")
        response = http.Response(403, request=request)
        raise HfHubHTTPError("403 Forbidden: no write access\nmore details", response=response)

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    with pytest.raises(HubError) as error:
        push_folder(tmp_path, "someone/else")
    assert str(error.value) == (
        "push of model someone/else failed: HTTP 403 (403 Forbidden: no write access)"
    )


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
