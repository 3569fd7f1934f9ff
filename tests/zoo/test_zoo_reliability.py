"""Reliability of the zoo layer: confined paths, locked zoo folders, atomic and
fingerprinted dataset saves, float-only weights, checked dataset metadata, one-commit dataset
pushes with one-line Hub errors, unfinished zoos, seed overlaps and file permissions."""

import importlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import _http as hub_http
from safetensors.torch import save_file

from fake_hub import HubError as FakeHubError
from sane_hf import ZooConfig, train_zoo
from sane_hf.cli import main
from sane_hf.hub import HubError, push_zoo_dataset
from sane_hf.zoo import training
from sane_hf.zoo.dataset import build_zoo_dataset
from sane_hf.zoo.formats import (
    ZooBusyError,
    atomic_save_safetensors,
    atomic_write_text,
    load_zoo_metadata,
    write_checkpoint,
    write_zoo_info,
    write_zoo_metadata,
    zoo_writer_lock,
)
from sane_hf.zoo.importing import ZooImportError, import_zoo
from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset
from synthetic_zoo import TOKENSIZE, template, write_raw_zoo

SRC = str(Path(__file__).parents[2] / "src")
TINY_ZOO = {"dataset_kwargs": {"num_samples": 100}, "batch_size": 10, "epochs": 1}


def small_raw_zoo(root: Path, num_models: int = 8) -> Path:
    return write_raw_zoo(root, num_models=num_models)


def build(raw: Path, **kwargs):
    return build_zoo_dataset(raw, tokensize=TOKENSIZE, align=False, progress=False, **kwargs)


def rewrite_records(raw: Path, change) -> None:
    records = load_zoo_metadata(raw)
    change(records)
    write_zoo_metadata(raw, records)


# ----------------------------------------------------------------------------------------------
# (1) paths from zoo metadata are confined to their folder


def test_import_refuses_a_model_id_that_would_write_outside_the_output(tmp_path):
    source = small_raw_zoo(tmp_path / "source", num_models=2)
    rewrite_records(source, lambda records: records[0].update(model_id="../../victim/settings"))
    with pytest.raises(ZooImportError, match=r"model_id '\.\./\.\./victim/settings'"):
        import_zoo(source, tmp_path / "out" / "raw", progress=False)
    assert not (tmp_path / "victim").exists()
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_import_refuses_a_file_outside_the_source_folder(tmp_path):
    source = small_raw_zoo(tmp_path / "source", num_models=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(template().state_dict(), outside / "x.safetensors")
    rewrite_records(source, lambda records: records[1].update(file="../outside/x.safetensors"))
    with pytest.raises(ZooImportError, match=r"'\.\./outside/x\.safetensors' points outside"):
        import_zoo(source, tmp_path / "raw", progress=False)


def test_import_refuses_a_crafted_progress_file(tmp_path):
    source = small_raw_zoo(tmp_path / "source", num_models=2)
    progress = tmp_path / "raw" / ".import_progress"
    progress.mkdir(parents=True)
    crafted = {"model_id": "model_0000", "skipped": [], "records": [{"model_id": "../x"}]}
    (progress / "model_0000.json").write_text(json.dumps(crafted))
    with pytest.raises(ZooImportError, match=r"model_0000\.json: model_id '\.\./x'"):
        import_zoo(source, tmp_path / "raw", progress=False)


def test_build_refuses_a_checkpoint_file_outside_the_zoo(tmp_path):
    raw = small_raw_zoo(tmp_path / "raw")
    save_file(template().state_dict(), tmp_path / "secret.safetensors")
    rewrite_records(raw, lambda records: records[0].update(file="../secret.safetensors"))
    with pytest.raises(ValueError, match=r"model 'model_0000'.*'\.\./secret\.safetensors' points"):
        build(raw)


# ----------------------------------------------------------------------------------------------
# (2) one writer per zoo folder


def test_a_second_writer_of_a_zoo_folder_is_refused_at_once(tmp_path):
    source = small_raw_zoo(tmp_path / "source", num_models=2)
    with zoo_writer_lock(tmp_path / "zoo"):
        start = time.perf_counter()
        with pytest.raises(ZooBusyError, match="being written by another process"):
            train_zoo(ZooConfig(num_models=1, **TINY_ZOO), tmp_path / "zoo", progress=False)
        with pytest.raises(ZooBusyError, match="being written by another process"):
            import_zoo(source, tmp_path / "zoo", progress=False)
        assert time.perf_counter() - start < 5
    assert not (tmp_path / "zoo" / "zoo.json").exists()


TRAIN_SCRIPT = """
import sys
from sane_hf import ZooConfig, train_zoo
config = ZooConfig(num_models=4, models_per_chunk=2, epochs=6, dataset_kwargs={"num_samples": 200})
train_zoo(config, sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_two_processes_training_one_zoo_folder(tmp_path):
    """The second `train_zoo` process is refused while the first runs; the zoo stays whole."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    zoo = tmp_path / "zoo"
    command = [sys.executable, "-c", TRAIN_SCRIPT, str(zoo)]
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the lock is taken before zoo.json is written
            if (zoo / "zoo.json").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, "the first process finished before the second one started"
        # the second process is this one (a fresh interpreter would spend seconds on imports)
        config = ZooConfig(
            num_models=4, models_per_chunk=2, epochs=6, dataset_kwargs={"num_samples": 200}
        )
        with pytest.raises(ZooBusyError, match="is being written by another process"):
            train_zoo(config, zoo, progress=False)
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        first.kill()
    records = load_zoo_metadata(zoo)
    pairs = [(record["model_id"], record["epoch"]) for record in records]
    assert len(pairs) == len(set(pairs)) == 4 * 7
    assert not (zoo / "train_state").exists()


# ----------------------------------------------------------------------------------------------
# (4) atomic, fingerprinted dataset saves


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    raw = small_raw_zoo(root / "raw")
    return build(raw), build(raw, seed=1)


def test_a_same_size_arrow_file_of_another_build_is_refused(two_builds, tmp_path):
    first, second = two_builds
    save_zoo_dataset(first, tmp_path / "a")
    save_zoo_dataset(second, tmp_path / "b")
    [arrow] = sorted((tmp_path / "a" / "train").glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-100] ^= 0xFF  # same size, other content (state.json untouched)
    arrow.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"do not match the fingerprint in sane_zoo\.json"):
        load_zoo_dataset(tmp_path / "a")


def test_a_folder_mixing_two_builds_is_refused(two_builds, tmp_path):
    first, second = two_builds
    save_zoo_dataset(first, tmp_path / "a")
    save_zoo_dataset(second, tmp_path / "b")
    shutil.rmtree(tmp_path / "a" / "train")
    shutil.copytree(tmp_path / "b" / "train", tmp_path / "a" / "train")
    with pytest.raises(ValueError, match=r"do not match the fingerprint in sane_zoo\.json"):
        load_zoo_dataset(tmp_path / "a")


def test_saving_over_a_dataset_replaces_it_whole_and_refuses_other_folders(two_builds, tmp_path):
    first, second = two_builds
    save_zoo_dataset(first, tmp_path / "zoo")
    save_zoo_dataset(second, tmp_path / "zoo")
    assert load_zoo_dataset(tmp_path / "zoo").metadata.split == second.metadata.split
    # no temporary left, only the lock file of the folder's writers
    assert sorted(path.name for path in tmp_path.iterdir()) == [".zoo.lock", "zoo"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a zoo dataset"):
        save_zoo_dataset(first, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


SAVE_LOOP = """
import sys
from sane_hf.zoo.storage import load_zoo_dataset, save_zoo_dataset
builds = [load_zoo_dataset(path) for path in sys.argv[1:3]]
print("ready", flush=True)
for i in range(10**6):
    save_zoo_dataset(builds[i % 2], sys.argv[3])
"""


@pytest.mark.slow
def test_a_save_killed_at_random_points_leaves_a_complete_dataset(two_builds, tmp_path):
    splits = []
    for name, dataset in zip("ab", two_builds):
        save_zoo_dataset(dataset, tmp_path / name)
        splits.append(dataset.metadata.split)
    target = tmp_path / "target"
    save_zoo_dataset(two_builds[0], target)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SAVE_LOOP,
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                str(target),
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not target.exists():  # killed between the two renames of the swap
            with pytest.raises(FileNotFoundError, match="a save over it was interrupted"):
                load_zoo_dataset(target)
            (previous,) = tmp_path.glob(".target.old-*/target")
            previous.rename(target)
        assert load_zoo_dataset(target).metadata.split in splits


# ----------------------------------------------------------------------------------------------
# (6) integer weights and non-finite values name file, model and parameter


def test_integer_weights_are_refused_at_import_and_at_build(tmp_path):
    raw = small_raw_zoo(tmp_path / "raw")
    record = load_zoo_metadata(raw)[0]
    state_dict = {k: v.round().long() for k, v in template().state_dict().items()}
    save_file(state_dict, raw / record["file"])

    with pytest.raises(ValueError) as error:
        build(raw)
    message = str(error.value)
    assert record["file"] in message and "model 'model_0000'" in message
    assert "parameter '1.weight' has dtype torch.int64, expected float" in message

    report = import_zoo(raw, tmp_path / "imported", progress=False)
    (item,) = [item for item in report.skipped if item.epoch == 0 and item.model_id == "model_0000"]
    assert item.path == record["file"]
    assert "model model_0000: parameter '1.weight' has dtype torch.int64" in item.reason


def test_non_finite_weights_at_build_name_file_model_and_parameter(tmp_path):
    raw = small_raw_zoo(tmp_path / "raw")
    record = load_zoo_metadata(raw)[-1]
    state_dict = template().state_dict()
    state_dict["4.bias"][3] = float("nan")
    save_file(state_dict, raw / record["file"])
    with pytest.raises(ValueError, match=r"model_0007_epoch_004.*model 'model_0007'.*'4\.bias'"):
        build(raw)


# ----------------------------------------------------------------------------------------------
# (7) sane_zoo.json is checked against the rows


def _tamper(description: dict, how: str) -> None:
    key = next(iter(description["normalization"]["std"]))
    models = description["split"]["models"]
    if how == "std_nan":
        description["normalization"]["std"][key] = float("nan")
    elif how == "std_zero":
        description["normalization"]["std"][key] = 0.0
    elif how == "mean_inf":
        description["normalization"]["mean"][key] = float("inf")
    elif how == "swapped_splits":
        models["train"], models["test"] = models["test"], models["train"]
    elif how == "overlapping_splits":
        models["test"] = [*models["test"], models["train"][0]]
    elif how == "tokensize":
        description["layout"]["tokensize"] += 1
        description["tokenizer"]["tokensize"] += 1
    elif how == "std_tiny":
        description["normalization"]["std"][key] = 1e-300
    elif how == "no_fingerprint":
        del description["fingerprint"]
    elif how == "reference_from_test":
        description["alignment"].update(aligned=True, reference_model_id=models["test"][0])
    elif how == "num_classes":
        description["zoo"]["architecture_kwargs"]["num_classes"] = 7
    elif how == "unknown_architecture":
        description["zoo"]["architecture"] = "transformer_xl"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("std_nan", "normalization std of .* is nan, not finite"),
        ("std_zero", "normalization std of .* is 0.0, must be > 0"),
        ("mean_inf", "normalization mean of .* is inf, not finite"),
        ("swapped_splits", "split 'train' lists other models than its rows"),
        ("overlapping_splits", "is listed in 'train' and 'test'"),
        ("tokensize", "layout tokensize 14 .* does not match the 'train' tokens of size 13"),
        ("std_tiny", r"normalization std of .* is 1e-300, must be > 0"),
        ("no_fingerprint", "records no content fingerprint of the Arrow files"),
        ("reference_from_test", "is not a model of the train split"),
        ("num_classes", "the layout does not match the zoo architecture 'mlp'"),
        ("unknown_architecture", "zoo architecture 'transformer_xl' .* cannot be built"),
    ],
)
def test_a_tampered_sane_zoo_json_is_refused(two_builds, tmp_path, how, message):
    save_zoo_dataset(two_builds[0], tmp_path / "zoo")
    path = tmp_path / "zoo" / "sane_zoo.json"
    description = json.loads(path.read_text())
    _tamper(description, how)
    path.write_text(json.dumps(description))
    with pytest.raises(ValueError, match=message) as error:
        load_zoo_dataset(tmp_path / "zoo")
    assert "\n" not in str(error.value) and "sane_zoo.json" in str(error.value)


# ----------------------------------------------------------------------------------------------
# (8) dataset pushes: one commit, one-line errors, nothing lost


def _fail(fake_hub, monkeypatch, route: str, status: int) -> None:
    """Make the fake Hub answer ``status`` to every request of one route."""

    def failing(request):
        raise FakeHubError(status, f"injected {status}")

    routes = [
        (methods, pattern, failing if handler.__name__ == route else handler)
        for methods, pattern, handler in fake_hub._routes
    ]
    monkeypatch.setattr(fake_hub, "_routes", routes)


def test_a_dataset_push_is_one_commit_and_replaces_old_data_files(two_builds, fake_hub):
    """Checks our use of the Hub client against the in-memory fake Hub, not a real upload."""
    repo_id = "fake-user/one-commit"
    push_zoo_dataset(two_builds[0], repo_id)
    assert fake_hub.commit_titles(repo_id, repo_type="dataset")[1:] == ["initial commit"]
    stale = "data/old-00000-of-00001.parquet"  # e.g. a shard of an earlier, larger push
    HfApi().upload_file(
        path_or_fileobj=b"x", path_in_repo=stale, repo_id=repo_id, repo_type="dataset"
    )
    push_zoo_dataset(two_builds[1], repo_id)
    assert len(fake_hub.commit_titles(repo_id, repo_type="dataset")) == 4
    files = set(fake_hub.repo_files(repo_id, repo_type="dataset"))
    assert {"README.md", "sane_zoo.json", "data/train-00000-of-00001.parquet"} <= files
    assert stale not in files
    assert load_zoo_dataset(repo_id).metadata.split == two_builds[1].metadata.split


def test_a_push_failing_mid_way_leaves_no_half_repo(two_builds, fake_hub, monkeypatch, tmp_path):
    _fail(fake_hub, monkeypatch, "_commit", 500)
    with pytest.raises(HubError) as error:
        push_zoo_dataset(two_builds[0], "fake-user/half", keep_on_failure=tmp_path / "kept")
    message = str(error.value)
    assert "fake-user/half" in message and "HTTP 500" in message and "\n" not in message
    assert f"kept in {tmp_path / 'kept'}" in message
    assert load_zoo_dataset(tmp_path / "kept").metadata.split == two_builds[0].metadata.split
    assert set(fake_hub.repo_files("fake-user/half", repo_type="dataset")) == {".gitattributes"}


def test_an_unauthorized_push_is_one_line_naming_repo_and_status(two_builds, fake_hub, monkeypatch):
    _fail(fake_hub, monkeypatch, "_create_repo", 401)
    with pytest.raises(HubError, match=r"^push of zoo dataset fake-user/denied failed: HTTP 401"):
        push_zoo_dataset(two_builds[0], "fake-user/denied")


def test_cli_build_keeps_the_dataset_when_the_push_fails(fake_hub, monkeypatch, tmp_path, capsys):
    raw = small_raw_zoo(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    _fail(fake_hub, monkeypatch, "_commit", 500)
    argv = ["zoo", "build", str(raw), "--push-to-hub", "fake-user/lost", "--no-align"]
    assert main([*argv, "--tokensize", str(TOKENSIZE), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the upload's progress bars
    assert "fake-user/lost failed: HTTP 500" in error
    assert "the built dataset is kept in lost-zoo-dataset" in error
    assert load_zoo_dataset(tmp_path / "lost-zoo-dataset").metadata.layout.tokensize == TOKENSIZE


# ----------------------------------------------------------------------------------------------
# smaller items


def test_build_refuses_an_unfinished_zoo_unless_allowed(tmp_path):
    raw = small_raw_zoo(tmp_path / "raw")
    (raw / "train_state").mkdir()
    with pytest.raises(ValueError, match=r"unfinished zoo \(train_state/ is present\)"):
        build(raw)
    shutil.rmtree(raw / "train_state")
    info = json.loads((raw / "zoo.json").read_text())
    write_zoo_info(raw, info | {"num_models": 9})
    with pytest.raises(ValueError, match="8 of the 9 models"):
        build(raw)
    assert len(build(raw, allow_incomplete=True).metadata.split["models"]["train"]) == 5
    argv = ["zoo", "build", str(raw), "--output", str(tmp_path / "ds"), "--no-align"]
    argv += ["--tokensize", str(TOKENSIZE), "--no-progress", "--allow-incomplete"]
    assert main(argv) == 0


def test_overlapping_seed_ranges_of_sibling_zoos_warn(tmp_path, monkeypatch):
    first = ZooConfig(num_models=3, seed=0, **TINY_ZOO)
    zoo_json = {"config": first.to_dict()}
    write_zoo_info(tmp_path / "zoo_a", zoo_json)
    monkeypatch.setattr(training, "_start_or_resume", _stop)
    overlap = r"seeds 0\.\.2; this zoo's seeds 2\.\.3 overlap"
    with pytest.warns(UserWarning, match=overlap), pytest.raises(_Stopped):
        train_zoo(ZooConfig(num_models=2, seed=2, **TINY_ZOO), tmp_path / "zoo_b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_Stopped):
            train_zoo(ZooConfig(num_models=2, seed=3, **TINY_ZOO), tmp_path / "zoo_c")


class _Stopped(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stopped


def test_files_get_the_permissions_of_the_users_umask(two_builds, tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "zoo.json", "{}")
        save_zoo_dataset(two_builds[0], tmp_path / "zoo")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "zoo.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "zoo").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "zoo" / "sane_zoo.json").stat().st_mode) == 0o644


def test_the_glibc_heap_setting_is_opt_in(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "keep_freed_memory_on_the_heap", lambda: calls.append(1))
    config = ZooConfig(num_models=1, **TINY_ZOO)
    train_zoo(config, tmp_path / "a" / "default", progress=False)
    assert calls == []
    train_zoo(config, tmp_path / "b" / "tuned", progress=False, keep_freed_memory=True)
    assert calls == [1]


def test_ray_trial_files_linked_from_outside_the_source_are_refused(tmp_path):
    source = tmp_path / "ray" / "trial_a"
    source.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "params.json").write_text('{"seed": 0}')
    (source / "params.json").symlink_to(tmp_path / "elsewhere" / "params.json")
    with pytest.raises(ZooImportError, match=r"model model_0000: file 'trial_a/params\.json'"):
        import_zoo(tmp_path / "ray", tmp_path / "raw", architecture="mlp", progress=False)


def _disconnect(*args, **kwargs):
    """What the Hub client raises when the server drops the connection mid-commit."""
    from huggingface_hub import errors as hub_errors

    http = importlib.import_module(hub_errors.Response.__module__.split(".")[0])
    raise http.RemoteProtocolError("Server disconnected without sending a response.")


@pytest.mark.parametrize("failure", ["lfs_upload_500", "disconnect"])
def test_cli_build_keeps_the_dataset_when_the_upload_fails(
    fake_hub, monkeypatch, tmp_path, capsys, failure
):
    raw = small_raw_zoo(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    if failure == "lfs_upload_500":
        _fail(fake_hub, monkeypatch, "_lfs_upload", 500)
        monkeypatch.setattr(
            hub_http, "time", SimpleNamespace(sleep=lambda seconds: None)
        )  # retries
    else:
        monkeypatch.setattr(HfApi, "create_commit", _disconnect)
    argv = ["zoo", "build", str(raw), "--push-to-hub", "fake-user/lost", "--no-align"]
    assert main([*argv, "--tokensize", str(TOKENSIZE), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "push of zoo dataset fake-user/lost failed:" in error
    assert ("HTTP 500" if failure == "lfs_upload_500" else "Server disconnected") in error
    assert "the built dataset is kept in lost-zoo-dataset" in error
    assert load_zoo_dataset(tmp_path / "lost-zoo-dataset").metadata.layout.tokensize == TOKENSIZE


def test_safetensors_files_get_the_permissions_of_the_users_umask(tmp_path):
    """safetensors writes 0600 files; checkpoints, references, heads and samples should not be."""
    previous = os.umask(0o022)
    try:
        write_checkpoint(tmp_path, "m0", 0, template().state_dict())
        atomic_save_safetensors(template().state_dict(), tmp_path / "reference.safetensors")
    finally:
        os.umask(previous)
    for path in (
        tmp_path / "checkpoints" / "m0_epoch_000.safetensors",
        tmp_path / "reference.safetensors",
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_second_build_to_one_output_is_refused_at_once(two_builds, tmp_path, capsys):
    raw = small_raw_zoo(tmp_path / "raw", num_models=7)
    output = tmp_path / "zoo"
    with zoo_writer_lock(tmp_path, ".zoo.lock"):  # a first build to --output, still running
        start = time.perf_counter()
        argv = ["zoo", "build", str(raw), "--output", str(output), "--no-align", "--no-progress"]
        assert main([*argv, "--tokensize", str(TOKENSIZE)]) == 1
        assert time.perf_counter() - start < 5
        assert "being written by another process" in capsys.readouterr().err
        with pytest.raises(ZooBusyError):
            save_zoo_dataset(two_builds[0], output)
    assert not output.exists()
    assert main([*argv, "--tokensize", str(TOKENSIZE)]) == 0  # the lock is the build's, not left
    assert load_zoo_dataset(output).metadata.layout.tokensize == TOKENSIZE


def test_a_save_removes_the_staging_folders_of_killed_saves(two_builds, tmp_path):
    stale = tmp_path / ".zoo.building-abc123"
    (stale / "train").mkdir(parents=True)
    save_zoo_dataset(two_builds[0], tmp_path / "zoo")
    assert not stale.exists()
    assert load_zoo_dataset(tmp_path / "zoo").metadata.split == two_builds[0].metadata.split


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_parallel_build_leaves_no_process_behind(tmp_path):
    raw = small_raw_zoo(tmp_path / "raw", num_models=40)
    command = [sys.executable, "-m", "sane_hf", "zoo", "build", str(raw), "--output"]
    command += [str(tmp_path / "zoo"), "--tokensize", str(TOKENSIZE), "--num-proc", "2"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    build = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(children := _children(build.pid)) < 3 and time.time() < deadline:
        time.sleep(0.2)  # the manager and both workers
    assert len(children) >= 3 and build.poll() is None
    build.kill()
    build.wait()
    deadline = time.time() + 10
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; its new parent reaps it


def test_a_build_removes_the_temporary_caches_of_killed_builds(tmp_path, monkeypatch):
    from sane_hf.zoo import dataset as zoo_dataset

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # datasets' and ours
    killed = tmp_path / "hf_datasets-killed" / "sane_zoo_abc"
    running = tmp_path / "hf_datasets-running" / "sane_zoo_def"
    unowned = tmp_path / "hf_datasets-old" / "sane_zoo_ghi"  # no owner lock: not ours to judge
    for folder in (killed, running, unowned):
        folder.mkdir(parents=True)
        (folder / "data.arrow").write_bytes(b"x" * 100)
    (killed / ".owner.lock").touch()  # its owner was killed: the OS released the lock
    with zoo_writer_lock(running.parent, "sane_zoo_def/.owner.lock"):  # its owner still runs
        fresh = Path(zoo_dataset._temporary_cache_dir())
        assert not killed.exists()
        assert (running / "data.arrow").exists() and (unowned / "data.arrow").exists()
    assert fresh.is_dir() and fresh.name.startswith("sane_zoo_")
