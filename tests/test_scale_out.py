"""Scaling out: parallel dataset builds equal serial ones, one progress bar with the
total, and a failing rank stops a multi-process zoo run while the work done stays committed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sane_hf import cli
from sane_hf.zoo.dataset import build_zoo_dataset, split_models
from sane_hf.zoo.distributed import shared_progress
from sane_hf.zoo.formats import load_zoo_metadata
from sane_hf.zoo.population import steps_per_epoch
from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset
from sane_hf.zoo.tasks import load_dataset_by_name
from synthetic_zoo import TOKENSIZE, write_raw_zoo

SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def build(raw: Path, **kwargs):
    return build_zoo_dataset(raw, tokensize=TOKENSIZE, progress=False, **kwargs)


def saved_files(folder: Path) -> dict[str, bytes]:
    """Every file of a saved dataset but datasets' ``dataset_info.json``, which records how the
    rows were generated (``shard_lengths`` of the workers, their summed writer byte counts)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "dataset_info.json"
    }


@pytest.fixture(scope="module")
def raw_zoo(tmp_path_factory) -> Path:
    return write_raw_zoo(tmp_path_factory.mktemp("raw") / "raw", num_models=12)


@pytest.fixture(scope="module")
def serial(raw_zoo, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serial") / "dataset"
    save_zoo_dataset(build(raw_zoo), folder)
    return folder


@pytest.mark.slow
def test_a_parallel_build_equals_a_serial_build(raw_zoo, serial, tmp_path):
    parallel = build(raw_zoo, num_proc=2)
    reference = load_zoo_dataset(serial)
    assert parallel.metadata == reference.metadata
    for split, rows in reference.splits.items():
        assert parallel.splits[split].num_rows == rows.num_rows
        assert parallel.splits[split].to_dict() == rows.to_dict(), split
    save_zoo_dataset(parallel, tmp_path / "dataset")
    # same rows, same sane_zoo.json (fingerprint included), same Arrow files, byte for byte
    files = saved_files(tmp_path / "dataset")
    assert sorted(files) == sorted(saved_files(serial))
    assert [name for name, data in saved_files(serial).items() if files[name] != data] == []
    assert any(name.endswith(".arrow") for name in files)


def test_the_fingerprint_follows_the_inputs(raw_zoo, serial, tmp_path):
    """Derived from the inputs, not random: a rebuild matches, other inputs do not."""
    recorded = load_zoo_dataset(serial).metadata.fingerprint
    save_zoo_dataset(build(raw_zoo), tmp_path / "again")
    assert load_zoo_dataset(tmp_path / "again").metadata.fingerprint == recorded
    save_zoo_dataset(build(raw_zoo, seed=1), tmp_path / "other_split")
    assert load_zoo_dataset(tmp_path / "other_split").metadata.fingerprint != recorded
    other = tmp_path / "raw"
    write_raw_zoo(other, num_models=12)
    records = load_zoo_metadata(other)
    checkpoint = other / records[-1]["file"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:-4] + b"\0\0\0\0")  # one weight changed
    save_zoo_dataset(build(other), tmp_path / "other_weights")
    assert load_zoo_dataset(tmp_path / "other_weights").metadata.fingerprint != recorded


def test_a_parallel_build_reports_a_bad_checkpoint_in_one_line(raw_zoo, tmp_path):
    broken = tmp_path / "raw"
    write_raw_zoo(broken, num_models=10)
    records = load_zoo_metadata(broken)
    model_id = split_models([record["model_id"] for record in records])["test"][-1]
    bad = next(record for record in records if record["model_id"] == model_id)
    (broken / bad["file"]).write_bytes(b"not safetensors")  # read by a worker, not the parent
    with pytest.raises(ValueError, match=rf"checkpoint .*{model_id}.* \(model '{model_id}'\)"):
        build(broken, num_proc=2)


@pytest.mark.parametrize("num_proc", [0, -1, 1.5, True])
def test_num_proc_must_be_a_positive_whole_number(raw_zoo, num_proc):
    with pytest.raises(ValueError, match="num_proc must be a whole number >= 1"):
        build(raw_zoo, num_proc=num_proc)


def _count_in_worker(counter, n):
    for _ in range(n):
        counter.update(1)
    counter.flush()


def test_worker_processes_advance_one_bar_with_the_total(capsys):
    import multiprocess

    with (
        shared_progress(30, "counting", show=True, num_proc=3) as counter,
        multiprocess.Pool(3) as pool,
    ):
        pool.starmap(_count_in_worker, [(counter, 10)] * 3)
    err = capsys.readouterr().err
    assert "counting" in err and "30/30" in err


@pytest.mark.slow
def test_cli_build_with_num_proc_saves_the_serial_dataset(raw_zoo, serial, tmp_path):
    from sane_hf.cli import main

    output = tmp_path / "dataset"
    args = ["zoo", "build", str(raw_zoo), "--output", str(output), "--num-proc", "2"]
    assert main([*args, "--tokensize", str(TOKENSIZE), "--no-progress"]) == 0
    assert (output / "sane_zoo.json").read_bytes() == (serial / "sane_zoo.json").read_bytes()


# A zoo run whose rank 1 fails on its second chunk (models 6 and 7), after committing its first.
FAILING_RUN = """
import os, sys
from sane_hf.cli import main
from sane_hf.zoo.population import ChunkTrainer

train = ChunkTrainer.run

def run(self, output_dir, state_path, bar):
    if os.environ["RANK"] == "1" and self.specs[0].model_id.endswith("6"):
        raise ValueError(f"injected failure in {self.specs[0].model_id}")
    return train(self, output_dir, state_path, bar)

ChunkTrainer.run = run
sys.exit(main(sys.argv[1:]))
"""
ZOO_ARGS = ["--num-models", "8", "--models-per-chunk", "2", "--epochs", "3"]
ZOO_ARGS += ["--set", "dataset_kwargs.num_samples=100"]


@pytest.mark.slow
def test_a_failing_rank_stops_the_run_with_its_error_and_the_work_done_stays(tmp_path):
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    zoo = tmp_path / "zoo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launcher, str(script), "zoo", "train", "--output", str(zoo), *ZOO_ARGS]
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "injected failure in model_0006" in run.stderr
    # one bar, rank 0's, with the steps of both ranks (4 chunks of 3 epochs)
    digits = load_dataset_by_name("digits", (1, 28, 28), num_samples=100)
    total = 4 * 3 * steps_per_epoch(digits, 10)
    assert f"/{total} " in run.stderr and f"/{total // 2} " not in run.stderr
    # rank 1's first chunk (models 2 and 3) was committed before the failure, and stays
    records = [json.loads(line) for line in (zoo / "metadata.jsonl").read_text().splitlines()]
    finished = {record["model_id"] for record in records}
    assert {"model_0002", "model_0003"} <= finished
    assert not {"model_0006", "model_0007"} & finished
    # and a rerun (one process, here) finishes the zoo from there, retraining none of them
    assert cli.main(["zoo", "train", "--output", str(zoo), *ZOO_ARGS, "--no-progress"]) == 0
    records = [json.loads(line) for line in (zoo / "metadata.jsonl").read_text().splitlines()]
    assert len({record["model_id"] for record in records}) == 8
    assert len(records) == 8 * 4  # epochs 0-3, each checkpoint once


RELEASED = Path(__file__).parents[1] / "checkpoints" / "sane-cnn-mnist"


def _torchrun(processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={processes}", "-m", "sane_hf"]


def _sane_hf(processes: int, argv: list[str], capsys) -> str:
    """``sane-hf ARGV`` on ``processes`` processes (torchrun), or for one process in this one
    with one thread like the workers (a fresh interpreter would spend seconds importing); its
    stdout."""
    if processes > 1:
        run = subprocess.run(
            [*_torchrun(processes), *argv], env=ENV, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


@pytest.mark.slow
def test_two_process_embed_and_predict_equal_one_process(tmp_path, capsys):
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from sane_hf import build_model

    folder = tmp_path / "nets"
    folder.mkdir()
    for seed in range(5):  # odd: the ranks get 3 and 2 networks
        torch.manual_seed(seed)
        network = build_model("cnn_s", in_channels=1, num_classes=10)
        save_file(network.state_dict(), folder / f"cnn_{seed}.safetensors")
    results = {}
    for processes in (1, 2):
        embeddings = tmp_path / f"embeddings_{processes}.parquet"
        predictions = tmp_path / f"predictions_{processes}.json"
        for command in (
            ["embed", str(RELEASED), str(folder), "--output", str(embeddings), "--layer-means"],
            ["predict", str(RELEASED), str(folder), "--output", str(predictions)],
        ):
            stdout = _sane_hf(processes, [*command, "--device", "cpu"], capsys)
        assert stdout.count("cnn_4") == 1  # the table printed once, by rank 0
        results[processes] = (pq.read_table(embeddings).to_pydict(), predictions.read_text())
    assert results[1][0]["id"] == [f"cnn_{seed}" for seed in range(5)]
    assert results[2][0] == results[1][0]
    assert results[2][1] == results[1][1]


@pytest.mark.slow
def test_two_process_sample_equals_one_process(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from sane_hf import SaneConfig, SaneModel
    from synthetic_zoo import build_synthetic_zoo

    torch.manual_seed(0)
    SaneModel(SaneConfig.from_preset("tiny", tokensize=TOKENSIZE)).save_pretrained(tmp_path / "m")
    save_zoo_dataset(build_synthetic_zoo(tmp_path / "zoo_build"), tmp_path / "zoo")
    argv = ["sample", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "zoo")]
    argv += ["--num-samples", "2", "--num-candidates", "3", "--num-prompts", "3"]
    argv += ["--prompt-metric", "train_acc", "--finetune-epochs", "1", "--window", "8"]
    argv += ["--halo", "4", "--score-samples", "50", "--device", "cpu"]
    argv += ["--methods", "kde", "subsampled", "prior"]  # 2 methods on rank 0, 1 on rank 1
    outputs = {}
    for processes in (1, 2):
        output = tmp_path / f"out_{processes}"
        stdout = _sane_hf(processes, [*argv, "--output-dir", str(output)], capsys)
        assert stdout.count("from scratch") == 1  # printed once, by rank 0
        outputs[processes] = output
    assert (outputs[2] / "sampling.json").read_text() == (outputs[1] / "sampling.json").read_text()
    files = sorted(path.relative_to(outputs[1]) for path in outputs[1].rglob("*.safetensors"))
    assert len(files) == 3 * 2
    assert files == sorted(p.relative_to(outputs[2]) for p in outputs[2].rglob("*.safetensors"))
    for file in files:
        expected, actual = load_file(outputs[1] / file), load_file(outputs[2] / file)
        assert all(torch.equal(actual[name], value) for name, value in expected.items()), file
