"""Test-suite wide setup: an offline fake Hugging Face Hub and an isolated HF cache.

Why the environment is set here, at import time: `huggingface_hub.constants`, `datasets.config`
and `transformers` copy `HF_ENDPOINT`, `HF_HOME`, the cache paths and `HF_HUB_DISABLE_XET` into
module constants when they are first imported, and some objects capture them too (the module
level `huggingface_hub.hf_api.api = HfApi()`, `datasets.config.HUB_DATASETS_URL`, cached
`HfFileSystem` instances). Patching every copy afterwards is fragile across versions. pytest
imports this conftest before it collects any test module, so setting the variables here makes
every later import see the fake Hub. The server is therefore bound (ephemeral port) and started
right now, for the whole session: a test that reaches the Hub without the fixture gets a fast
404 from 127.0.0.1, never the network. The `fake_hub` fixture checks that the endpoint really
took effect and fails with an explanation if huggingface_hub was imported earlier (for example
by a plugin or by `python -c "import transformers; pytest.main()"`).

Usage in a test::

    def test_push(fake_hub, tmp_path):
        model.push_to_hub("fake-user/my-model")  # any namespace works; `fake_hub.reset()` ran before
        assert "model.safetensors" in fake_hub.repo_files("fake-user/my-model")
"""

import os
import shutil
import sys

# OpenMP threads that spin while waiting steal the second core from the other thread or from
# the 2-process pretraining test on a 2-core CI machine; passive waiting made tests several times
# faster there. It must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub

_FAKE_HUB = FakeHub().start()
_HF_HOME = tempfile.mkdtemp(prefix="sane-hf-test-hf-home-")
os.environ.update(
    {
        "HF_ENDPOINT": _FAKE_HUB.endpoint,
        "HF_TOKEN": "hf_fake_token_for_tests",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": _HF_HOME,
        "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
        "HF_DATASETS_CACHE": os.path.join(_HF_HOME, "datasets"),
    }
)
for _name in (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
):
    os.environ.pop(_name, None)


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub's own LFS upload passes a file object as `data=`; not ours to fix.
    config.addinivalue_line(
        "filterwarnings", "ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    _FAKE_HUB.stop()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


def _check_endpoint_took_effect() -> None:
    from huggingface_hub import constants

    if _FAKE_HUB.endpoint != constants.ENDPOINT:
        raise RuntimeError(
            f"huggingface_hub uses endpoint {constants.ENDPOINT!r}, not the fake Hub at "
            f"{_FAKE_HUB.endpoint!r}: it was imported before tests/conftest.py set HF_ENDPOINT. "
            "Run the tests with plain `python -m pytest` and do not import huggingface_hub, "
            "transformers or datasets from a pytest plugin."
        )


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    """The session's fake Hub, emptied before the test: no repos, no LFS objects, no request log."""
    from huggingface_hub import HfFileSystem, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    _check_endpoint_took_effect()
    _FAKE_HUB.reset()
    HfFileSystem.clear_instance_cache()  # cached instances keep listings of the previous test
    set_client_factory(lambda: _route_huggingface_co_to_fake(default_client_factory()))
    yield _FAKE_HUB
    set_client_factory(default_client_factory)


def _route_huggingface_co_to_fake(client: Any) -> Any:
    """Send requests for a hard-coded https://huggingface.co to the fake Hub as well.

    huggingface_hub 1.x validates model cards at "https://huggingface.co/api/validate-yaml"
    whatever `HF_ENDPOINT` says, so `ModelCard.push_to_hub` would otherwise leave the machine.
    """
    fake = urlsplit(_FAKE_HUB.endpoint)

    def reroute(request: Any) -> None:
        if request.url.host == "huggingface.co":
            request.url = request.url.copy_with(scheme="http", host=fake.hostname, port=fake.port)
            request.headers["Host"] = fake.netloc

    client.event_hooks = {
        **client.event_hooks,
        "request": [reroute, *client.event_hooks["request"]],
    }
    return client


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call the returned function to switch to `HF_HUB_OFFLINE=1` for the rest of the test.

    The libraries read the variable at import, so their copies are patched too (undone after the test).
    """

    def go_offline() -> None:
        import datasets
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    return go_offline


@pytest.fixture(scope="session")
def tiny_digits_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo dataset folder from the real pipeline at CPU-test size, built once per session.

    `train_zoo` trains 8 CNN-s for 2 epochs on 300 digits (checkpoints at epochs 0, 1, 2), then
    `build_zoo_dataset` splits (5/1/2 models), aligns, normalizes and tokenizes them.
    """
    from sane_hf.zoo.config import ZooConfig
    from sane_hf.zoo.dataset import build_zoo_dataset
    from sane_hf.zoo.storage import save_zoo_dataset
    from sane_hf.zoo.training import train_zoo

    root = tmp_path_factory.mktemp("tiny_digits_zoo")
    config = ZooConfig(
        architecture="cnn_s",
        dataset="digits",
        dataset_kwargs={"num_samples": 300},
        num_models=8,
        epochs=2,
        batch_size=32,
    )
    train_zoo(config, root / "raw", progress=False)
    save_zoo_dataset(build_zoo_dataset(root / "raw", progress=False), root / "dataset")
    return root / "dataset"


@pytest.fixture(scope="session")
def synthetic_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The splits of the synthetic MLP zoo dataset of `synthetic_zoo.py` (20 models x 5 epochs), built once."""
    from synthetic_zoo import build_synthetic_zoo

    return build_synthetic_zoo(tmp_path_factory.mktemp("synthetic_zoo")).splits


@pytest.fixture(scope="session")
def synthetic_sane():
    """An untrained tiny SANE (seed 0, eval mode) for the synthetic zoo's token size."""
    import torch

    from sane_hf import SaneConfig, SaneModel
    from synthetic_zoo import TOKENSIZE

    torch.manual_seed(0)
    return SaneModel(SaneConfig.from_preset("tiny", tokensize=TOKENSIZE)).eval()
