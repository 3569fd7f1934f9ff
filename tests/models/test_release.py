"""The checkpoint shipped in the repository (checkpoints/sane-cnn-mnist, made by
scripts/release_sane_cnn_mnist.py) must load and sample with the current code."""

import json
from pathlib import Path

import pytest
import torch

import sane_hf.models.sane
from sane_hf import SaneModel, SaneSampler
from sane_hf.models.sane.modeling_sane import SaneDecoderModel, SaneEncoderModel
from sane_hf.zoo.formats import DATASET_METADATA_FILE
from sane_hf.zoo.metadata import ZooMetadata

RELEASE = Path(__file__).parents[2] / "checkpoints" / "sane-cnn-mnist"


@pytest.mark.parametrize("model_class", [SaneModel, SaneEncoderModel, SaneDecoderModel])
def test_released_checkpoint_loads_every_weight(model_class):
    model, info = model_class.from_pretrained(RELEASE, output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16


def test_released_checkpoint_samples_networks_that_classify_mnist_shaped_inputs():
    model = SaneModel.from_pretrained(RELEASE, dtype=torch.float32).eval()
    metadata = ZooMetadata.from_dict(json.loads((RELEASE / DATASET_METADATA_FILE).read_text()))
    sampler = SaneSampler.from_zoo(model, metadata)
    # Two prompts in normalized token space (noise around the zoo's mean weights): the sampler
    # encodes them, draws from the KDE, decodes, de-normalizes and builds CNN-s networks.
    noise = torch.randn(2, *sampler.mask.shape, generator=torch.Generator().manual_seed(0))
    prompts = 0.1 * noise * sampler.mask
    samples = sampler.sample(prompts, 2, generator=torch.Generator().manual_seed(0))
    assert len(samples) == 2
    for network in samples.models:
        logits = network(torch.randn(3, 1, 28, 28))
        assert logits.shape == (3, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["configuration_sane.py", "modeling_sane.py"])
@pytest.mark.parametrize("release", sorted(p.name for p in RELEASE.parent.iterdir() if p.is_dir()))
def test_shipped_remote_code_equals_the_package(release, name):
    """The remote-code copies next to every released model are the package's model files,
    verbatim."""
    source = Path(sane_hf.models.sane.__file__).parent / name
    assert (RELEASE.parent / release / name).read_text() == source.read_text(), (
        f"checkpoints/{release}/{name} differs from src: copy the package file over it"
    )
