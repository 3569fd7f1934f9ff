"""Zoo training across processes (torchrun, gloo on CPU): the same zoo, byte for byte, whatever
the number of processes, also after a kill and a resume with another number of processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sane_hf.cli import main
from sane_hf.zoo.distributed import Ranks, my_share

SRC = str(Path(__file__).parents[2] / "src")
ZOO_ARGS = ["--num-models", "6", "--models-per-chunk", "2", "--epochs", "6"]
ZOO_ARGS += ["--set", "dataset_kwargs.num_samples=100", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def train_in_this_process(output: Path) -> None:
    """``sane-hf zoo train`` as one process, here (a fresh interpreter would spend seconds on
    imports), with one thread like each torchrun worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["zoo", "train", "--output", str(output), *ZOO_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)


def two_processes(output: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, "-m", "sane_hf", "zoo", "train", "--output", str(output), *ZOO_ARGS]


def zoo_files(zoo: Path) -> dict[str, bytes]:
    """Every file of a finished raw zoo (lock files aside: they hold nothing)."""
    return {
        str(path.relative_to(zoo)): path.read_bytes()
        for path in sorted(zoo.rglob("*"))
        if path.is_file() and not path.name.endswith(".lock")
    }


@pytest.fixture(scope="module")
def reference_zoo(tmp_path_factory) -> dict[str, bytes]:
    zoo = tmp_path_factory.mktemp("one") / "zoo"
    train_in_this_process(zoo)
    return zoo_files(zoo)


def test_chunks_are_dealt_round_robin():
    chunks = list(range(5))
    assert my_share(chunks, Ranks(0, 2)) == [0, 2, 4]
    assert my_share(chunks, Ranks(1, 2)) == [1, 3]
    assert my_share(chunks, Ranks()) == chunks


@pytest.mark.slow
def test_two_processes_train_the_same_zoo_as_one(reference_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    run = subprocess.run(two_processes(zoo), env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    files = zoo_files(zoo)
    assert sorted(files) == sorted(reference_zoo)
    assert [name for name in files if files[name] != reference_zoo[name]] == []
    assert len([name for name in files if name.startswith("checkpoints/")]) == 6 * 7


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_one_process(reference_zoo, tmp_path):
    zoo = tmp_path / "zoo"
    run = subprocess.Popen(two_processes(zoo), env=ENV, start_new_session=True)
    try:
        for _ in range(6000):  # until the first chunk is committed
            if (zoo / "metadata.jsonl").exists() or run.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers
        run.wait()
    assert (zoo / "train_state").exists(), "the run finished before it could be killed"
    command = [sys.executable, "-m", "sane_hf", "zoo", "train", "--output", str(zoo), *ZOO_ARGS]
    subprocess.run(command, env=ENV, check=True, capture_output=True, timeout=600)
    files = zoo_files(zoo)
    assert sorted(files) == sorted(reference_zoo)
    assert [name for name in files if files[name] != reference_zoo[name]] == []
