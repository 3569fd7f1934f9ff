import pytest
import torch

from sane_hf import build_model, register_architecture
from sane_hf.zoo.architectures import list_architectures


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "params"),
    [
        ("cnn_s", {"in_channels": 1}, (2, 1, 28, 28), 2464),
        ("cnn_s", {"in_channels": 3}, (2, 3, 28, 28), 2864),
        ("cnn_m", {}, (2, 3, 32, 32), 10853),
    ],
)
def test_model_zoo_parameter_counts(name, kwargs, shape, params):
    model = build_model(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.randn(shape)).shape == (2, 10)


def test_resnets_run():
    assert build_model("resnet18", num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert build_model("resnet_bottleneck")(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_unknown_architecture_and_registration():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nope")
    register_architecture("tiny_linear_test", lambda: torch.nn.Linear(3, 2))
    assert "tiny_linear_test" in list_architectures()
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("tiny_linear_test", lambda: torch.nn.Linear(3, 2))
