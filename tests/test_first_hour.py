"""What a new user meets in the first hour: a mistyped path, a ``.pt`` state_dict, AutoProcessor
without sane-hf, a model folder or raw zoo where a zoo dataset belongs."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sane_hf import build_model, cli
from sane_hf.models.sane.network_inputs import iter_networks

ROOT = Path(__file__).parents[1]
RELEASE = ROOT / "checkpoints" / "sane-cnn-mnist"

MISTYPED = "checkpoints/sane-cnn-mnsit"  # beside an existing checkpoints/ folder
COMMANDS = {
    "probe": ["probe", "--model", MISTYPED, "--dataset", "zoos/digits"],
    "sample": ["sample", "--model", MISTYPED, "--dataset", "zoos/digits", "--output-dir", "s"],
    "embed": ["embed", MISTYPED, "nets", "--output", "e.parquet"],
    "predict": ["predict", MISTYPED, "nets"],
    "pretrain": ["pretrain", "--config", "tiny", "--dataset", "checkpoints/digits-zoo"],
    "zoo info": ["zoo", "info", MISTYPED],
    "zoo build": ["zoo", "build", MISTYPED, "--output", "zoos/built"],
    "push": ["push", MISTYPED, "someone/sane"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistyped_local_path_is_no_such_folder_at_once(
    command, tmp_path, monkeypatch, capsys, fake_hub
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "nets").mkdir()
    (tmp_path / "zoos" / "digits").mkdir(parents=True)
    assert cli.main(COMMANDS[command]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"sane-hf {command.split()[0]}: error: ")
    assert "no such file or folder" in error and error.count("\n") == 1
    assert fake_hub.requests == []  # never asked the Hub


def test_a_name_of_a_missing_file_is_not_read_as_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nets/missing\.safetensors: no such file"):
        list(iter_networks("nets/missing.safetensors"))


def test_torch_state_dicts_are_read_without_running_pickled_code(tmp_path):
    network = build_model("cnn_s", in_channels=1)
    torch.save(network.state_dict(), tmp_path / "net.pt")
    ((name, state_dict),) = iter_networks(tmp_path / "net.pt")
    assert name == "net" and state_dict.keys() == network.state_dict().keys()
    assert all(torch.equal(state_dict[k], v) for k, v in network.state_dict().items())

    class Payload:  # what a malicious checkpoint would carry
        def __reduce__(self):
            return (Path.touch, (tmp_path / "code-ran",))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "model.bin").write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    torch.save(network, tmp_path / "whole_module.pth")  # a pickled nn.Module, not a state_dict
    for bad in (tmp_path / "evil", tmp_path / "whole_module.pth"):
        with pytest.raises(
            ValueError, match=r"torch\.load\(weights_only=True\).*save_file"
        ) as error:
            list(iter_networks(bad))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "code-ran").exists()


BLOCK_SANE_HF = """
import importlib.abc, sys

class NoSaneHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "sane_hf":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoSaneHf())
from transformers import AutoProcessor

try:
    AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as error:
    print(error)
"""


def test_auto_processor_without_sane_hf_says_pip_install_sane_hf():
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("PYTHONPATH", None)  # the editable install would still find sane_hf
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_SANE_HF, str(RELEASE)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install sane-hf" in done.stdout


def test_a_saved_processor_ships_the_pointer_to_sane_hf(tmp_path):
    from sane_hf import SaneProcessor

    SaneProcessor.from_pretrained(RELEASE).save_pretrained(tmp_path)
    assert (tmp_path / "processing_sane.py").read_text() == (
        RELEASE / "processing_sane.py"
    ).read_text()
    assert SaneProcessor.from_pretrained(tmp_path).tokensize == 289


def test_zoo_info_on_a_model_folder_names_zoo_build(capsys):
    assert cli.main(["zoo", "info", str(RELEASE)]) == 1
    error = capsys.readouterr().err
    assert "is a model folder" in error and "sane-hf zoo build" in error


def test_a_raw_zoo_given_as_dataset_names_zoo_build(tmp_path, capsys):
    from synthetic_zoo import write_raw_zoo

    raw = write_raw_zoo(tmp_path / "raw", num_models=2)
    argv = ["probe", "--model", str(RELEASE), "--dataset", str(raw)]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err
    assert (
        f"is a raw zoo (zoo.json), not a zoo dataset: build its dataset with `sane-hf zoo build {raw}"
        in error
    )


def test_the_demo_writes_into_an_ignored_folder():
    demo = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    default = demo.get_default("output_dir")
    assert f"/{default}/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_readme_fine_tuning_recipe_runs(tmp_path, monkeypatch):
    """The README's recipe (measured there on the demo's zoo) on the synthetic zoo, for a step."""

    from sane_hf import SaneConfig, SaneModel, save_zoo_dataset
    from synthetic_zoo import TOKENSIZE, build_synthetic_zoo

    readme = (ROOT / "README.md").read_text()
    [recipe] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "with_labels(" in b]
    assert "learning_rate=1e-3, num_train_epochs=20" in recipe
    monkeypatch.chdir(tmp_path)
    save_zoo_dataset(build_synthetic_zoo(tmp_path / "build", num_models=10), "demo_outputs/dataset")
    torch.manual_seed(0)
    SaneModel(SaneConfig.from_preset("tiny", tokensize=TOKENSIZE)).save_pretrained(
        "demo_outputs/sane"
    )
    recipe = recipe.replace("num_train_epochs=20", "max_steps=1, use_cpu=True")
    namespace = {}
    exec(compile(recipe, "README.md fine-tuning recipe", "exec"), namespace)
    assert namespace["predicted_test_acc"].shape == (len(namespace["validation"]), 1)
