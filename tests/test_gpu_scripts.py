"""The GPU drivers (``scripts/gpu/run_gpu_*.sh``) run every step of theirs on the CPU in their
dry run, started from another folder, and write the summary, the log and the tarball that a GPU
run brings back; the committed results stay untouched."""

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from benchmarks.gpu_run import BENCHMARKS, Runner, step

ROOT = Path(__file__).parents[1]


def dry_run(script: str, output_dir: Path, cwd: Path) -> dict:
    """Run a driver's dry run from ``cwd``; returns its summary, checked against its tarball."""
    started = time.time()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "BUDGET_S": "600"}
    environment.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu" / script), "--dry-run", "--output-dir", output_dir],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    committed = ROOT / "benchmarks" / "results"
    assert not [p.name for p in committed.iterdir() if p.stat().st_mtime >= started]
    return json.loads(done.stdout[done.stdout.index("{\n") : done.stdout.rindex("}") + 1])


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_benchmarks_dry_run_goes_through_every_benchmark(tmp_path):
    summary = dry_run("run_gpu_benchmarks.sh", tmp_path / "out", cwd=tmp_path)
    assert summary["device"] == "Dry-run stand-in GPU" and summary["dry_run"]
    assert list(summary["steps"]) == [each.name for each in BENCHMARKS]
    assert all(status.startswith("ok") for status in summary["steps"].values()), summary
    members = tar_members(tmp_path / "out" / "gpu_results.tgz")
    results = tmp_path / "out" / "dry-run" / "results"
    assert set(members) == {f"benchmarks/results/{p.name}" for p in results.glob("*.json")}
    # one file per variant, the sampling and embedding ones under their own names
    names = {Path(name).stem for name in members}
    assert {"bench_sample_gpu", "bench_sample_gpu_short_halo", "bench_embed_gpu"} <= names
    assert {"bench_train_step_tiny_compile_graph", "bench_pretrain_epoch_tiny"} <= names
    assert json.loads(members["benchmarks/results/gpu_run.json"]) == summary
    assert "=== step_cnn_eager" in (tmp_path / "out" / "benchmarks.log").read_text()


@pytest.mark.slow
def test_reproduction_dry_run_trains_the_zoo_then_reproduces(tmp_path):
    """About 50 CPU seconds: the smoke scale of benchmarks.reproduce.mnist, the smallest."""
    summary = dry_run("run_gpu_reproduction.sh", tmp_path / "out", cwd=tmp_path)
    assert list(summary["steps"]) == ["zoo", "reproduction"]
    assert all(status.startswith("ok") for status in summary["steps"].values()), summary
    assert summary["finished"]
    members = tar_members(tmp_path / "out" / "reproduce_mnist_gpu.tgz")
    assert "benchmarks/results/bench_zoo_h100.json" in members
    assert "benchmarks/results/reproduce_mnist_smoke.json" in members
    assert "outputs/reproduce/mnist-gpu/stage_times.json" in members
    assert "outputs/reproduce/mnist-gpu/sane/training_summary.json" in members


def test_a_step_is_skipped_when_the_budget_is_short_and_a_failure_is_recorded(tmp_path):
    runner = Runner("benchmarks", budget_s=30, output_dir=tmp_path, dry_run=False)
    assert runner.step(step("long", 60, 40, "speed.bench_train_step")) == "skipped"
    status = runner.step(step("missing", 20, 1, "speed.no_such_benchmark"))
    assert status.startswith("failed (exit 1)")
    log = (tmp_path / "benchmarks.log").read_text()
    assert "No module named benchmarks.speed.no_such_benchmark" in log
    assert "--- long: skipped" in log
