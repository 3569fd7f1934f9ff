"""Round trips through the fake Hub of `tests/fake_hub.py` with the real `huggingface_hub` client.

The fake checks our use of the client (which calls we make, that what we push comes back
byte-for-byte, that errors surface as the client's exceptions), not the real upload path: no
Xet storage, no authentication, no server-side validation. `test_real_hub_round_trip` is the
opt-in check against huggingface.co.
"""

import os
import uuid
from pathlib import Path

import pytest

TEXT_CONTENT = "SANE fake hub\n"
WEIGHTS_CONTENT = bytes(range(256)) * 16  # binary, and *.safetensors is an LFS pattern


def _write_model_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "notes.txt": TEXT_CONTENT.encode(),
        "weights/model.safetensors": WEIGHTS_CONTENT,
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files


@pytest.fixture
def uploaded_model(fake_hub, tmp_path) -> tuple[str, dict[str, bytes]]:
    from huggingface_hub import create_repo, upload_folder

    repo_id = "fake-user/tiny-model"
    files = _write_model_folder(tmp_path / "upload")
    create_repo(repo_id)
    upload_folder(repo_id=repo_id, folder_path=tmp_path / "upload", commit_message="Add weights")
    return repo_id, files


def test_upload_folder_commits_text_as_regular_and_weights_through_lfs(fake_hub, uploaded_model):
    repo_id, files = uploaded_model

    committed = fake_hub.repo_files(repo_id)
    assert sorted(committed) == sorted([".gitattributes", *files])
    assert {name: committed[name] for name in files} == files
    assert fake_hub.commit_titles(repo_id) == ["Add weights", "initial commit"]
    lfs_puts = [path for method, path in fake_hub.requests if method == "PUT"]
    assert len(lfs_puts) == 1, "only the safetensors file should travel through LFS"
    assert fake_hub.unhandled_requests == []


def test_hf_hub_download_and_snapshot_download_return_the_uploaded_bytes(fake_hub, uploaded_model):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    repo_id, files = uploaded_model

    for name, content in files.items():
        assert Path(hf_hub_download(repo_id, name)).read_bytes() == content
    snapshot = Path(snapshot_download(repo_id))
    for name, content in files.items():
        assert (snapshot / name).read_bytes() == content
    lfs_info = HfApi().get_paths_info(repo_id, ["weights/model.safetensors"])[0].lfs
    assert lfs_info is not None and lfs_info.size == len(WEIGHTS_CONTENT)


def test_offline_mode_serves_downloads_from_the_cache(fake_hub, uploaded_model, hf_offline):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, files = uploaded_model
    online_snapshot = snapshot_download(repo_id)
    hf_offline()
    fake_hub.requests.clear()

    assert snapshot_download(repo_id) == online_snapshot
    assert Path(hf_hub_download(repo_id, "notes.txt")).read_bytes() == files["notes.txt"]
    assert fake_hub.requests == [], "offline mode must not reach the Hub"


def test_file_system_reads_byte_ranges(fake_hub, uploaded_model):
    from huggingface_hub import HfFileSystem

    repo_id, _ = uploaded_model
    with HfFileSystem().open(f"{repo_id}/weights/model.safetensors", "rb", block_size=64) as remote:
        remote.seek(100)
        assert remote.read(10) == WEIGHTS_CONTENT[100:110]
    assert HfFileSystem().ls(f"{repo_id}/weights", detail=False) == [
        f"{repo_id}/weights/model.safetensors"
    ]


def test_missing_repo_folder_and_file_raise_the_client_errors(fake_hub, uploaded_model):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    repo_id, _ = uploaded_model
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("fake-user/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("fake-user/does-not-exist")
    with pytest.raises(EntryNotFoundError):
        list(HfApi().list_repo_tree(repo_id, path_in_repo="no-such-folder"))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "no-such-file.json")


def test_branches_pull_requests_deletions_and_repo_deletion(fake_hub, uploaded_model):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id, _ = uploaded_model
    api = HfApi()
    assert api.whoami()["name"] == "fake-user"
    api.create_repo(repo_id, exist_ok=True)

    api.create_branch(repo_id, branch="v1")
    api.upload_file(
        path_or_fileobj=b"v1 only", path_in_repo="v1.txt", repo_id=repo_id, revision="v1"
    )
    assert sorted(ref.name for ref in api.list_repo_refs(repo_id).branches) == ["main", "v1"]
    assert fake_hub.repo_files(repo_id, revision="v1")["v1.txt"] == b"v1 only"
    assert "v1.txt" not in fake_hub.repo_files(repo_id)

    pull_request = api.upload_file(
        path_or_fileobj=b"proposal", path_in_repo="proposal.txt", repo_id=repo_id, create_pr=True
    )
    assert pull_request.pr_num == 1
    assert "proposal.txt" in fake_hub.repo_files(repo_id, revision="refs/pr/1")

    api.delete_folder("weights", repo_id=repo_id)
    api.delete_file("notes.txt", repo_id=repo_id)
    assert sorted(fake_hub.repo_files(repo_id)) == [".gitattributes"]

    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)


def test_transformers_push_to_hub_and_model_card_round_trip(fake_hub):
    import torch
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import AutoModel, BertConfig, BertModel

    repo_id = "fake-user/tiny-bert"
    config = BertConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
    )
    model = BertModel(config)
    model.push_to_hub(repo_id)
    ModelCard.from_template(
        ModelCardData(library_name="sane-hf", license="apache-2.0")
    ).push_to_hub(repo_id)

    reloaded = AutoModel.from_pretrained(repo_id)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
    assert ModelCard.load(repo_id).data.library_name == "sane-hf"


def test_dataset_dict_push_to_hub_and_load_dataset_round_trip(fake_hub):
    import datasets

    repo_id = "fake-user/tiny-zoo"
    pushed = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"model_id": ["a", "b", "c"], "test_acc": [0.5, 0.7, 0.9]}
            ),
            "test": datasets.Dataset.from_dict({"model_id": ["d"], "test_acc": [0.25]}),
        }
    )
    pushed.push_to_hub(repo_id)

    loaded = datasets.load_dataset(repo_id)
    assert sorted(loaded) == ["test", "train"]
    for split in pushed:
        assert loaded[split].to_dict() == pushed[split].to_dict()
        assert loaded[split].features == pushed[split].features
    assert fake_hub.unhandled_requests == []


@pytest.mark.real_hub
@pytest.mark.skipif(
    not os.environ.get("SANE_HF_REAL_HUB_TOKEN"), reason="needs SANE_HF_REAL_HUB_TOKEN"
)
def test_real_hub_round_trip(tmp_path):
    """The same upload/download against huggingface.co, in a private repo deleted afterwards."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint="https://huggingface.co", token=os.environ["SANE_HF_REAL_HUB_TOKEN"])
    repo_id = f"{api.whoami()['name']}/sane-hf-test-{uuid.uuid4().hex[:8]}"
    files = _write_model_folder(tmp_path / "upload")
    api.create_repo(repo_id, private=True)
    try:
        api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "upload")
        for name, content in files.items():
            path = api.hf_hub_download(repo_id, name, cache_dir=tmp_path / "cache")
            assert Path(path).read_bytes() == content
    finally:
        api.delete_repo(repo_id)
